"""The status line: what the engine and the load are doing now (from the latest sample), and the caller."""

from __future__ import annotations

from textual.widgets import Static

from tui.model import Sample


class StatusLine(Static):
    def show(self, s: Sample | None, caller: bool, note: str = "", where: str | None = None, turns: str = "") -> None:
        """where: the remote server, if the engine is not in this process; turns: the voice loop's turn detection
        and cut-offs."""
        if s is None:
            self.update(f"waiting for the engine ...  {note}")
            return
        mode = "[b reverse] BATCHED [/]" if s.mode == "batched" else "[b reverse] LATENCY [/]"
        voice = f"caller [b]{'on' if caller else 'off'}[/]" + (f" · turns [b]{turns}[/]" if turns else "")
        parts = ([where] if where else []) + [f"synthetic users [b]{s.users}[/]", f"speculation [b]{s.drafter or 'off'}[/]",
                 f"chunked prefill [b]{'on' if s.chunked_prefill else 'off'}[/]", voice,
                 f"running {s.running} · queued {s.waiting} · preempted {'-' if s.preemptions is None else s.preemptions}",
                 f"measured over the last {s.window_s:.0f} s"] + ([f"runs {s.setup}"] if s.setup else [])
        self.update(f"{mode}  " + "  │  ".join(parts + ([note] if note else [])))
