"""Snapshots of the main screen at 160 x 60 (and 120 x 40), fed from a recorded metrics stream (no engine, no voice loop,
no clock on screen), so a change of layout or rendering shows up as a diff. Update after an intended
change with `pytest tests/tui/test_snapshots.py --snapshot-update` and look at the new SVG."""

from tests.tui.conftest import recorded_messages, wait_for
from tui.app import TradeoffApp
from tui.controller import Options
from tui.messages import Loaded


class ReplayController:
    """No engine: every number comes from the recording."""

    STAGES = 1
    engine = None
    where = None  # in this process
    foreign = False  # the engine panels are the recording's own
    users = 0
    controls_sent = controls_applied = 0

    def __init__(self) -> None:
        self.options = Options(caller=False)
        self.profile = self.options.profile

    def sample(self) -> None:
        return None

    def level(self) -> None:  # no synthetic users: no level for the planner
        return None

    def close(self) -> None:
        pass


class ReplayApp(TradeoffApp):
    def __init__(self) -> None:
        super().__init__(Options(caller=False), controller=ReplayController())

    def start(self) -> None:  # nothing to load and no voice loop: the screen is fed from the recording
        self.post_message(Loaded())


async def feed(pilot) -> None:
    app = pilot.app
    await wait_for(pilot, lambda: app.ready, 10, "the dashboard")
    for message in recorded_messages():  # each to the handler its message reaches (posting a burst would
        getattr(app.dashboard, message.handler_name)(message)  # merge the samples: MetricsUpdated.can_replace)
    await pilot.pause()


def test_main_screen_from_a_recorded_stream(snap_compare):
    assert snap_compare(ReplayApp(), terminal_size=(160, 60), run_before=feed)


def test_main_screen_shrinks_to_120x40(snap_compare):
    assert snap_compare(ReplayApp(), terminal_size=(120, 40), run_before=feed)
