"""The conversation as it happens: what the server heard (or what was typed), the reply as it streams,
each turn's numbers under its reply, and notes about the voice loop. The latest lines stay in view."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

from tui.model import VoiceTurn, ms_text


@dataclass
class Entry:
    role: str  # "you", "bot" or "note"
    text: str
    response_id: str | None = None
    status: str | None = None
    numbers: str | None = None
    style: str = ""


def turn_numbers(turn: VoiceTurn) -> str:
    parts = []
    if turn.parts_ms:
        parts.append(f"E2E {ms_text(turn.e2e_ms)}")
    parts.append(f"LLM TTFT {ms_text(turn.llm_ttft_ms)}")
    if turn.tbt_p50_ms is not None:
        parts.append(f"TBT p50 {ms_text(turn.tbt_p50_ms)}")
    if (decision := turn.decision()) is not None:
        parts.append(f"turn ended by {decision}")
    if turn.cut_off:
        parts.append("CUT OFF mid-sentence")
    return " · ".join(parts)


class Transcript(Widget):
    MAX_ENTRIES = 200

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.entries: list[Entry] = []

    def add_user(self, text: str, typed: bool) -> None:
        self._add(Entry("you", text + ("  (typed)" if typed else "")))

    def show_reply(self, response_id: str, text: str, status: str | None) -> None:
        entry = next((e for e in reversed(self.entries) if e.response_id == response_id), None)
        if entry is None:
            self._add(Entry("bot", text, response_id, status))
        else:
            entry.text, entry.status = text, status
            self.refresh()

    def add_numbers(self, turn: VoiceTurn) -> None:
        """Under the latest finished reply that has none yet."""
        entry = next((e for e in reversed(self.entries) if e.role == "bot" and e.numbers is None), None)
        if entry is not None:
            entry.numbers = turn_numbers(turn)
            self.refresh()

    def add_note(self, text: str, error: bool = False) -> None:
        self._add(Entry("note", text, style="red" if error else "dim"))

    def _add(self, entry: Entry) -> None:
        self.entries.append(entry)
        del self.entries[: -self.MAX_ENTRIES]
        self.refresh()

    def render(self) -> Text:
        lines = []
        width = max(self.size.width, 1)
        for e in self.entries:
            text = Text()
            if e.role == "note":
                text.append(f"· {e.text}", style=e.style)
            else:
                text.append(f"{e.role}> ", style="bold green" if e.role == "you" else "bold cyan").append(e.text)
                if e.status not in (None, "completed"):
                    text.append(f"  [{e.status}]", style="yellow")
                if e.numbers:
                    text.append(f"\n     {e.numbers}", style="dim")
            lines += text.wrap(self.app.console, width)
        return Text("\n").join(lines[-max(self.size.height, 1):])
