"""A headline number: big digits with a label, coloured by how the value stands against its SLO."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.reactive import reactive
from textual.widgets import Digits

from tui.model import BAD, GOOD, NONE, WARN

GRADES = (GOOD, WARN, BAD, NONE)


class Headline(Vertical):
    """`text` shows in the digits, `unit` under them; `grade` (good/warn/bad/none) sets the CSS class -good etc."""

    text: reactive[str] = reactive("-", init=False)
    unit: reactive[str] = reactive("")
    grade: reactive[str] = reactive(NONE)

    def __init__(self, label: str, unit: str = "", *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = label
        self.set_reactive(Headline.unit, unit)

    def compose(self) -> ComposeResult:
        yield Digits("-")

    def show(self, text: str, grade: str, unit: str | None = None) -> None:
        self.text = text
        self.grade = grade
        if unit is not None:
            self.unit = unit

    def watch_text(self, text: str) -> None:
        self.query_one(Digits).update(text)

    def watch_unit(self, unit: str) -> None:
        self.border_subtitle = unit

    def watch_grade(self, old: str, new: str) -> None:
        self.remove_class(f"-{old}")
        self.add_class(f"-{new}")
