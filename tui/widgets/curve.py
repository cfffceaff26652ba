"""The trade-off curve: tokens/s per user against total tokens/s, one point per load level measured this
session under the active profile (batched mode joined in order of users, latency mode apart), the region where a
user's stream meets the profile's TBT target shaded above its line, the levels that meet the whole SLO at its
percentile ringed, each mode's knee (its largest such level) named, and the current operating point."""

from __future__ import annotations

from textual_plotext import PlotextPlot

from tui.model import CurvePoint, TradeoffCurve
from tui.planning import PanelPlan
from tui.widgets.palette import RGB

COLORS = {"latency": "cyan", "batched": "orange"}
SHADE = (40, 80, 40)  # the SLO-feasible region: dim, so the points over it stay readable


class TradeoffChart(PlotextPlot):
    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.points: dict[str, list[CurvePoint]] = {}
        self.current: CurvePoint | None = None
        self.slo: float | None = None
        self.plan: PanelPlan | None = None

    def set_curve(self, curve: TradeoffCurve, slo_tok_s_per_user: float | None, plan: PanelPlan | None = None) -> None:
        self.points = {mode: curve.of_mode(mode) for mode in COLORS}
        self.current, self.slo, self.plan = curve.current, slo_tok_s_per_user, plan
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
        if self.slo is not None:  # shade first: everything else draws over it
            plt.plot([0, right], [top, top], fillx=self.slo, marker="·", color=SHADE)
        feasible = self.plan.feasible if self.plan else frozenset()
        knees = self.plan.knees if self.plan else {}
        for mode, points in self.points.items():
            if points:
                color = RGB[COLORS[mode]]
                plt.plot([p.total_tok_s for p in points], [p.tok_s_per_user for p in points], color=color, marker="dot")
                ok = [p for p in points if (mode, p.users) in feasible]
                if ok:
                    plt.scatter([p.total_tok_s for p in ok], [p.tok_s_per_user for p in ok], marker="o", color=RGB["green"])
                for p in points:  # the label starts just right of its point, so the point stays visible
                    label = f"{p.users} knee" if knees.get(mode) == p.users else f"{p.users}"
                    plt.text(label, p.total_tok_s + right / 50, p.tok_s_per_user, color=color, alignment="left")
        if self.current is not None:
            plt.scatter([self.current.total_tok_s], [self.current.tok_s_per_user], marker="@", color=RGB["white"])
        if self.slo is not None:  # a line over the shade (hline would draw under it)
            plt.plot([0, right], [self.slo, self.slo], color=RGB["red"], marker="─")
            plt.text("SLO", right / 100, self.slo, color=RGB["red"], alignment="left")
        plt.xlim(0, right)
        plt.ylim(0, top)
        plt.xlabel("total tok/s  (cyan: latency, orange: batched; labels: users; o: meets the SLO; @: now)")
        return super().render()
