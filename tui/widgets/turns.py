"""Per-turn voice latency: one stacked bar per turn, speech end to first reply audio, split into the
critical-path stages the server reports plus transport to the client (the latest turns at the bottom)."""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

from tui.model import VoiceTurn, grade, ms_text, stack
from tui.widgets.palette import hex_color
from voice.metrics import VOICE_SLO_MS

STAGE_STYLES = {name: (label, hex_color(color)) for name, label, color in (
    ("endpointing", "endpointing", "blue"), ("asr", "ASR", "purple"), ("queue", "queue", "red"),
    ("llm_ttft", "LLM TTFT", "yellow"), ("first_clause", "first clause", "green"), ("tts", "TTS", "cyan"),
    ("send", "send", "grey"), ("transport", "transport", "white"))}
GRADE_STYLES = {"good": hex_color("green"), "warn": hex_color("orange"), "bad": hex_color("red"), "none": ""}
LABEL_CELLS = 5  # "#12 "
NUMBER_CELLS = 15  # " 1234 ms ✂ c7" (✂: the caller was cut off mid-sentence; c7: added caller 7 spoke it)


class TurnBars(Widget):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.turns: list[VoiceTurn] = []

    def set_turns(self, turns: list[VoiceTurn]) -> None:
        self.turns = turns
        self.refresh()

    def render(self) -> Text:
        out = Text()
        for label, style in STAGE_STYLES.values():
            out.append("■ ", style=style).append(label + "  ")
        rows = self.size.height - len(out.wrap(self.app.console, max(self.size.width, 1)))  # under the legend
        shown = self.turns[-rows:] if rows > 0 else []
        width = max(self.size.width - LABEL_CELLS - NUMBER_CELLS, 1)
        scale = max([VOICE_SLO_MS] + [t.e2e_ms for t in shown if t.e2e_ms is not None and t.parts_ms])
        first = len(self.turns) - len(shown) + 1
        for i, turn in enumerate(shown, first):
            out.append(f"\n#{i:<3} ")
            if turn.parts_ms:
                for name, cells in stack(turn.parts_ms, width, scale):
                    out.append("█" * cells, style=STAGE_STYLES.get(name, STAGE_STYLES["transport"])[1])
                out.append(f" {ms_text(turn.e2e_ms)}", style=GRADE_STYLES[grade(turn.e2e_ms, VOICE_SLO_MS)])
                if turn.cut_off:
                    out.append(" ✂", style=GRADE_STYLES["bad"])
                if turn.caller:
                    out.append(f" c{turn.caller}", style="dim")
            else:
                out.append(f"{'typed' if turn.typed else turn.status}: LLM TTFT {ms_text(turn.llm_ttft_ms)}", style="italic")
        return out
