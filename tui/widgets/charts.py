"""Live charts: a value over the last minute (plotext, with an SLO line) and a small labelled sparkline."""

from __future__ import annotations

from collections.abc import Iterable

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline
from textual_plotext import PlotextPlot

from tui.model import Point, downsample
from tui.widgets.palette import RGB

SPAN_S = 60.0  # seconds of history on a chart


class TimeChart(PlotextPlot):
    """Series (name, label, colour) against seconds before the latest sample, each downsampled to the
    plot's width (latencies by max, so spikes stay visible), and a dashed SLO line if there is one."""

    def __init__(self, title: str, series: Iterable[tuple[str, str, str]], unit: str, how: str = "mean",
                 *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title, self.series, self.unit, self.how = title, tuple(series), unit, how
        self.data: dict[str, list[Point]] = {}
        self.end = 0.0
        self.slo: float | None = None

    def set_data(self, end: float, data: dict[str, Iterable[Point]], slo: float | None = None) -> None:
        self.end, self.slo = end, slo
        self.data = {name: list(points) for name, points in data.items()}
        self.refresh()

    def render(self):
        plt = self.plt
        plt.clear_figure()
        plt.title(self.title)
        width = max(self.size.width - 10, 10)  # less the y axis labels
        top = 0.0
        for name, label, color in self.series:
            points = downsample(self.data.get(name, ()), width, self.end, SPAN_S, self.how)
            if points:
                plt.plot([t - self.end for t, _ in points], [v for _, v in points], label=label, color=RGB[color],
                         marker="braille")
                top = max(top, max(v for _, v in points))
        if self.slo is not None:
            plt.hline(self.slo, RGB["red"])
            plt.text("SLO", -SPAN_S + 1, self.slo, color=RGB["red"])
            top = max(top, self.slo)
        plt.xlim(-SPAN_S, 0)
        plt.ylim(0, top * 1.15 or 1)
        plt.ylabel(self.unit)
        return super().render()


class Spark(Vertical):
    """A title with the latest value, over a sparkline of the last minute (time-binned to the width)."""

    def __init__(self, title: str, unit: str = "", *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title, self.unit = title, unit

    def compose(self) -> ComposeResult:
        yield Label(self.title)
        yield Sparkline([])

    def set_data(self, end: float, points: Iterable[Point], latest: str, note: str = "") -> None:
        """note: said in place of the unit (why there is no value)."""
        self.query_one(Label).update(f"{self.title}  [b]{latest}[/b] {note or self.unit}")
        spark = self.query_one(Sparkline)
        spark.data = [v for _, v in downsample(list(points), max(spark.size.width, 1), end, SPAN_S, "max")]
