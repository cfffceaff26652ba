"""The trade-off curve: tokens/s per user against total tokens/s, one point per load level measured this
session (batched mode joined in order of users, latency mode apart), the per-user SLO line, and the
current operating point highlighted."""

from __future__ import annotations

from textual_plotext import PlotextPlot

from tui.model import CurvePoint, TradeoffCurve
from tui.widgets.palette import RGB

COLORS = {"latency": "cyan", "batched": "orange"}


class TradeoffChart(PlotextPlot):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.points: dict[str, list[CurvePoint]] = {}
        self.current: CurvePoint | None = None
        self.slo: float | None = None

    def set_curve(self, curve: TradeoffCurve, slo_tok_s_per_user: float) -> None:
        self.points = {mode: curve.of_mode(mode) for mode in COLORS}
        self.current, self.slo = curve.current, slo_tok_s_per_user
        self.refresh()

    def render(self):
        plt = self.plt
        plt.clear_figure()
        plt.title("trade-off: tok/s per user vs total tok/s  (r: sweep)")
        xs, ys = [0.0], [0.0]
        for points in self.points.values():
            xs += [p.total_tok_s for p in points]
            ys += [p.tok_s_per_user for p in points]
        if self.slo is not None:
            ys.append(self.slo)
        right, top = max(xs) * 1.15 or 1, max(ys) * 1.15 or 1
        for mode, points in self.points.items():
            if points:
                color = RGB[COLORS[mode]]
                plt.plot([p.total_tok_s for p in points], [p.tok_s_per_user for p in points], color=color, marker="dot")
                for p in points:  # the label just right of its point, so the point stays visible
                    plt.text(f"{p.users}", p.total_tok_s + right / 50, p.tok_s_per_user, color=color)
        if self.current is not None:
            plt.scatter([self.current.total_tok_s], [self.current.tok_s_per_user], marker="@", color=RGB["white"])
        if self.slo is not None:
            plt.hline(self.slo, RGB["red"])
            plt.text("SLO", right / 100, self.slo, color=RGB["red"])
        plt.xlim(0, right)
        plt.ylim(0, top)
        plt.xlabel("total tok/s   (cyan: latency mode, orange: batched; labels: synthetic users; @: now)")
        return super().render()
