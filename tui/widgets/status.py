"""The status line: what the engine and the load are doing now (from the latest sample), and the caller."""

from __future__ import annotations

from textual.widgets import Static

from tui.model import Sample


class StatusLine(Static):
    def show(self, s: Sample | None, caller: bool, note: str = "", where: str | None = None, turns: str = "",
             added_callers: int = 0) -> None:
        """where: the remote server, if the engine is not in this process; turns: the voice loop's turn detection,
        cut-offs and goodput; added_callers: the simulated callers beside the first."""
        if s is None:
            self.update(f"waiting for the engine ...  {note}")
            return
        mode = f"[b reverse] {s.mode.upper()} [/]"
        if s.mode == "disaggregated":
            each = f" ({s.handoff_ms:.1f} ms, {s.handoff_mb:.1f} MB each)" if s.handoffs else ""
            mode += f"  hand-offs [b]{s.handoffs}[/]{each}"
        voice = (f"caller [b]{'on' if caller else 'off'}[/]" + (f" +[b]{added_callers}[/] added" if added_callers else "")
                 + (f" · turns [b]{turns}[/]" if turns else ""))
        parts = ([where] if where else []) + [f"synthetic users [b]{s.users}[/]", f"speculation [b]{s.drafter or 'off'}[/]",
                 f"chunked prefill [b]{'on' if s.chunked_prefill else 'off'}[/]", voice,
                 f"running {s.running} · queued {s.waiting} · preempted {'-' if s.preemptions is None else s.preemptions}",
                 f"measured over the last {s.window_s:.0f} s"] + ([f"runs {s.setup}"] if s.setup else [])
        notes = [n for n in (s.engine_note, note) if n]
        self.update(f"{mode}  " + "  │  ".join(parts + notes))
