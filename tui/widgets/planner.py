"""The planner panel: the active profile and its SLO, the levels the plan stands on (and the one being measured),
and per configuration what one replica sustains at the SLO, the replicas the target needs and their cost."""

from __future__ import annotations

from rich.markup import escape
from textual.widgets import Static


class PlannerPanel(Static):
    def show(self, title: str, measured: str, lines: list[str]) -> None:
        self.border_title = title
        self.update("\n".join([f"[dim]{escape(measured)}[/]", *(escape(line) for line in lines)]))
