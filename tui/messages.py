"""The messages that background work (the sampler, the voice loop, start-up) posts to the screens.

They are the only way data reaches widgets: workers post from their threads (`post_message` is
thread-safe) and the screen's handlers update the widgets on the UI thread. High-rate messages replace a
pending one of their kind (`can_replace`), so a busy UI skips stale readings instead of queueing them.
"""

from __future__ import annotations

from textual.message import Message

from tui.model import Sample, VoiceTurn
from tui.planning import PanelPlan


class MetricsUpdated(Message):
    """A reading; `controls_applied` counts the controls the backend had applied before it was taken."""

    def __init__(self, sample: Sample, controls_applied: int = 0) -> None:
        super().__init__()
        self.sample, self.controls_applied = sample, controls_applied

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MetricsUpdated)


class LoadProgress(Message):
    """Start-up: stage `step` of `total` is under way; `line` is a line of output to show."""

    def __init__(self, step: int, total: int, line: str) -> None:
        super().__init__()
        self.step, self.total, self.line = step, total, line


class Loaded(Message):
    """Start-up finished. `error`: why the engine could not start (the dashboard cannot open); `voice_error`:
    why the voice loop could not start (the dashboard opens without it)."""

    def __init__(self, error: str | None = None, voice_error: str | None = None) -> None:
        super().__init__()
        self.error, self.voice_error = error, voice_error


class UserSaid(Message):
    """What the server heard (or what was typed)."""

    def __init__(self, text: str, typed: bool = False) -> None:
        super().__init__()
        self.text, self.typed = text, typed


class AgentSaid(Message):
    """The reply so far (`done` when it ended, with its status)."""

    def __init__(self, response_id: str, text: str, done: bool = False, status: str | None = None) -> None:
        super().__init__()
        self.response_id, self.text, self.done, self.status = response_id, text, done, status

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, AgentSaid) and message.response_id == self.response_id and not message.done


class TurnMeasured(Message):
    def __init__(self, turn: VoiceTurn) -> None:
        super().__init__()
        self.turn = turn


class VoiceStatus(Message):
    """A line about the voice loop itself: connected, caller on/off, an error."""

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__()
        self.text, self.error = text, error


class Planned(Message):
    """The planner's answer for the measured levels (`error`: why it has none); `generation` says which request of
    the dashboard it answers, so a slow plan for an older target or profile is dropped."""

    def __init__(self, generation: int, plan: PanelPlan | None, error: str | None = None) -> None:
        super().__init__()
        self.generation, self.plan, self.error = generation, plan, error
