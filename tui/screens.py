"""The small screens: start-up progress, help, and the typed-message prompt."""

from __future__ import annotations

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Input, Label, Log, Markdown, ProgressBar, Static

from serve.profiles import PROFILES


class LoadingScreen(Screen):
    """Covers start-up (model fetch and conversion on first run, model load, speech recognizer, voice loop)
    with a progress bar over the stages and their output; prints from any thread land here too."""

    BINDINGS = [Binding("q", "app.quit", "Quit")]

    def compose(self) -> ComposeResult:
        with Vertical(id="loading-box"):
            yield Label("[b]tradeoff[/b]: starting ...", id="loading-title")
            yield ProgressBar(total=None, show_eta=False, id="loading-progress")
            yield Static("", id="loading-detail")
            yield Log(id="loading-log")
        yield Footer()

    def on_mount(self) -> None:
        self.begin_capture_print(stdout=True, stderr=True)

    def on_unmount(self) -> None:
        self.end_capture_print()

    def on_print(self, event: events.Print) -> None:
        if event.text.strip():
            self.query_one(Log).write_line(event.text.rstrip())

    def show(self, step: int, total: int, line: str) -> None:
        bar = self.query_one(ProgressBar)
        new_stage = bar.progress != step - 1 or bar.total != total
        bar.update(total=total, progress=step - 1)
        if new_stage:
            self.query_one(Log).write_line(line)
        self.query_one("#loading-detail", Static).update(line)

    def failed(self, error: str) -> None:
        self.query_one("#loading-title", Label).update("[b red]start-up failed[/]  (q quits)")
        self.query_one(Log).write_line(error)


HELP = """\
# tradeoff: keys

| key | what it does |
|---|---|
| `b` | next mode: **latency** (batch 1, speculation) -> **batched** (continuous batching) -> **disaggregated** |
| `l` | a long prompt (1,500 tokens) arrives: TBT spikes in batched mode, less with chunking, not disaggregated |
| `+` / `-` | synthetic users: 0, 1, 2, 4, 8, 16, 32, 64 (they share the engine with you) |
| `s` | speculative decoding on/off (latency mode) |
| `c` | chunked prefill on/off (batched mode) |
| `m` | the simulated caller on/off (it speaks through the real audio path; every third question pauses mid-sentence) |
| `a` | callers added as load, each on a session of its own: 1, 3, 7, none (2, 4, 8 callers in all) |
| `v` | turn detection: server_vad (300 ms of silence), semantic_vad high, medium, low (Smart Turn judges pauses) |
| `space` | push-to-talk on/off, when there is a microphone |
| `/` | type a message: same engine path, no ASR or TTS |
| `r` | auto-sweep: latency mode at 1 user, batched at 1-16, each until its percentile is measured (p99: 100 requests) |
| `p` | next workload profile: the synthetic users' lengths, the colours and the planner's SLO (below) |
| `t` | the planner's target: users, and a price per replica-hour (`500 2.50`) |
| `?` | this help |
| `q` | quit |

**Headline numbers** cover the time since the last change of mode or load (at most the engine's 30 s window):
TTFT and TBT over every request, voice end-to-end latency (speech end to first reply audio at the client),
output tokens/s of the whole engine and per user (mean of 1/TPOT). Green meets the active profile's SLO (TTFT,
TBT; voice 500 ms; per-user rate 1/TBT), amber is within 1.5x of it, red beyond.

**Voice turns**: each turn's numbers say what ended it (a silence, or Smart Turn's P(complete) and its time), and a
turn whose caller was cut off mid-sentence is marked ✂; the status line counts them. Each bar splits the time from
the end of speech into endpointing, ASR, queue (the reply's request waiting for the engine: latency mode serves one
at a time), LLM TTFT, the first clause, TTS, send and transport. An added caller's turns are marked c1, c2, ...;
the status line's goodput is the share of turns within 500 ms.

**Charts** show the last minute, each point over the last 5 s. **The curve** gets a point per load level
once it has held 5 s and requests finished; the shaded band is where a user's stream meets the TBT target, `o`
rings the levels whose percentiles meet the whole SLO, `knee` names each mode's largest one, and the white `@`
is where the engine is now.

**The planner** (the same as `tradeoff plan`) reads the levels measured under the active profile, once each has
the requests its percentile needs: per configuration, the users (thinking the profile's think time) and the
Poisson rate one replica sustains at the SLO, by a model of the engine fitted to the level's own steps (an
engine in this process; with `--backend` or `--connect` the users come from the response-time law, and there is
no rate), the replicas the target needs with 20% headroom, and their cost.

**Profiles** (`--profile NAME`, or a TOML/JSON file with the fields of serve/profiles.py `example_file()`):

{profiles}

**The same numbers in other tools** (docs/metrics.md has them all, with who counts the tokens):

| here | formula | vLLM | AIPerf | GuideLLM |
|---|---|---|---|---|
| TTFT | first token - arrival | `time_to_first_token_seconds` | TTFT | `time_to_first_token_ms` |
| TBT | gap between two chunks (a speculative step is one chunk) | `inter_token_latency_seconds` | inter chunk latency | - |
| TPOT (1 / tok/s per user) | (last - first token) / (tokens - 1) | `request_time_per_output_token_seconds` | ITL | ITL |
| acceptance | accepted / drafted tokens | `spec_decode_num_accepted_tokens / ..._draft_tokens` | draft acceptance rate | - |

With `--backend` at a server that is not tradeoff, the engine panels (running, queue, KV, acceptance) are what
its Prometheus `/metrics` says in vLLM's names; a panel it says nothing for stays empty, with a note.
"""


def profiles_table() -> str:
    rows = ["| profile | what it is | SLO |", "|---|---|---|"]
    for p in PROFILES.values():
        slo = (f"p{p.slo.percentile:g} TTFT ≤ {p.slo.ttft_s * 1000:.0f} ms, TBT ≤ {p.slo.tbt_s * 1000:.0f} ms"
               if p.slo else "none: cost per token decides")
        rows.append(f"| `{p.name}` | {p.description} | {slo} |")
    return "\n".join(rows)


class HelpScreen(Screen):
    """A full screen rather than a modal one: nothing behind it has to be drawn dimmed, so it opens at once."""

    BINDINGS = [Binding("escape,question_mark,q", "app.pop_screen", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Markdown(HELP.format(profiles=profiles_table()))
        yield Footer()


class LinePrompt(ModalScreen[str | None]):
    """One line of text: a message for the agent, or the planner's target; Enter gives it, Escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, label: str = "Message to the agent (Enter sends, Escape cancels):",
                 placeholder: str = "What is the capital of France?") -> None:
        super().__init__()
        self.label, self.placeholder = label, placeholder

    def compose(self) -> ComposeResult:
        with Vertical(id="prompt-box"):
            yield Label(self.label)
            yield Input(placeholder=self.placeholder)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)
