"""What the dashboard drives: a `Backend` (the engine in this process, or a remote one: --backend, --connect), the
synthetic users, their controls, and samples of their numbers. (The voice loop is tui/voice_link.py.)

Every method that may block (start-up, `sample`, `close`) is called from a worker thread, never from the
UI thread; the controls go to the backend in order on one thread of their own (a remote backend's take a
network round trip). The state shown (mode, speculation, users) is read from the backend's snapshot and the
load generator, never kept here.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from engine import Backend, Controls, Engine, Request, SamplingParams
from engine.gguf_convert import converted_folder
from engine.loader import load_tokenizer
from engine.registry import DEFAULT_MODEL, REGISTRY, cache_dir, local_file
from engine.setup import DTYPES
from serve.loadgen import LoadGenerator, Workload
from serve.profiles import PROFILES, Profile
from serve.remote import RemoteEngine
from tui.model import RECENT_S, USER_LEVELS, Sample
from tui.planning import LevelReading

LONG_PROMPT_TOKENS = 1500  # the dashboard's `l`: long enough that its prefill stalls a batched step for a second

Progress = Callable[[int, int, str], None]  # (stage, stages, line of output)


@dataclass(frozen=True)
class Options:
    """The dashboard's command-line choices (tui/launch.py)."""

    model: str = DEFAULT_MODEL
    device: str | None = None
    quant: str | None = None
    dtype: str | None = None  # fp32 | bf16
    cuda_path: str = "graphs"  # one of engine.engine.CUDA_PATHS
    spec: str = "auto"
    draft: str | None = None
    asr: str = "whisper"
    mode: str = "latency"
    disagg_threads: tuple[int, int] = (1, 1)  # disaggregated mode's (prefill, decode) worker threads
    users: int = 0  # synthetic users at start
    caller: bool | None = None  # the simulated caller; None = on when there is no microphone
    connect: str | None = None  # attach to a running `tradeoff serve` at this URL instead
    backend: str | None = None  # an OpenAI-compatible server to run the LLM on (openai://HOST:PORT/v1)
    api_key_env: str = "OPENAI_API_KEY"  # where the backend's key is
    backend_model: str | None = None
    profile: Profile = field(default_factory=lambda: PROFILES["chat"])  # the synthetic users' lengths and the SLO
    plan_users: int = 500  # the planner panel's target
    price_per_hour: float | None = None  # of one replica; None: the panel gives replicas, not costs
    sweep_users: tuple[int, ...] = (1, 2, 4, 8, 16)  # the auto-sweep's batched ladder (after latency mode at 1)
    level_s: float = 300.0  # the auto-sweep's time cap per level


def needs_fetch(model: str) -> bool:
    """Would loading `model` download or convert it first? (Only registry names are fetched.)"""
    if model not in REGISTRY:
        return False
    path = local_file(model)
    return path is None or not (converted_folder(path, cache_dir()) / "config.json").is_file()


def api_url(realtime: str) -> str:
    """ws://HOST:PORT[/v1/realtime] -> http://HOST:PORT/v1: where a `tradeoff serve` has its HTTP API."""
    parts = urlsplit(realtime)
    return f"{'https' if parts.scheme == 'wss' else 'http'}://{parts.netloc}/v1"


class Controller:
    """The backend and the synthetic users (a closed-loop load generator in this process).

    The engine runs here, or remotely: with `backend` the LLM runs on that server and every number is measured
    here, from the streams; with `connect` the whole voice loop runs on a `tradeoff serve`, so the numbers are
    its engine's own (every client's requests). Given an `engine`, the controller uses it and leaves it open on
    `close` (tests share one engine)."""

    STAGES = 3

    def __init__(self, options: Options, engine: Backend | None = None):
        self.options = options
        self.engine = engine
        self._owns_engine = engine is None
        self.loadgen: LoadGenerator | None = None
        self.profile = options.profile  # the active workload profile (`set_profile` changes it)
        self.started = time.monotonic()
        self.level_start = self.started  # the last change of mode or load: the headline numbers start here
        self._level_first = 0  # the first of the load generator's requests sent in this level
        self._steps = None  # this level's record of batched steps (an engine in this process)
        # controls apply in order on one thread: a remote engine's take a network round trip, which must not
        # hold the UI; a failure goes to `on_error` (the dashboard shows it)
        self._controls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="controls")
        self.controls_sent = 0  # controls handed to the controls thread ...
        self.controls_applied = 0  # ... and those it has finished (applied or refused): a reading taken after all
        self.on_error: Callable[[str], None] = lambda message: None
        self._fetch: subprocess.Popen | None = None
        self._closed = False

    # ---- start-up and shut-down (worker threads) -----------------------------------------------

    def start(self, progress: Progress) -> None:
        o = self.options
        if self.engine is None:
            if needs_fetch(o.model):  # a remote engine still sizes the synthetic prompts with its tokenizer
                self._fetch_model(progress)
            # every synthetic user on the ladder may wait at once, with room for the real user: the load alone
            # never gets requests refused
            max_waiting = USER_LEVELS[-1] + 8
            if o.backend or o.connect:
                url = o.backend or api_url(o.connect)
                progress(2, self.STAGES, f"connecting to {url} ...")
                engine = RemoteEngine(url, api_key=os.environ.get(o.api_key_env), model=o.backend_model,
                                      tokenizer=load_tokenizer(o.model), max_waiting=max_waiting)
            else:
                progress(2, self.STAGES, f"loading {o.model} ...")
                engine = Engine(o.model, device=o.device, quant=o.quant, dtype=DTYPES.get(o.dtype), spec=o.spec,
                                draft=o.draft, cuda_path=o.cuda_path, max_waiting=max_waiting, disagg_threads=o.disagg_threads,
                                progress=lambda line: progress(2, self.STAGES, line))
            if self._closed:  # quit while loading
                engine.close()
                return
            self.engine = engine
        engine = self.engine
        progress(2, self.STAGES, engine.describe())
        progress(3, self.STAGES, "starting synthetic users ...")
        if not o.connect:  # attached to a server, the dashboard takes the mode it is in
            engine.control(Controls(mode=o.mode))
        self.loadgen = LoadGenerator(engine, self.workload())
        self.loadgen.start(o.users)
        self._changed()

    def _fetch_model(self, progress: Progress) -> None:
        """`tradeoff fetch MODEL` in a child process, its output (pip, tqdm) shown line by line, so the
        download never writes over the screen."""
        progress(1, self.STAGES, f"fetching {self.options.model} (first run only) ...")
        cmd = [sys.executable, "-m", "tradeoff", "fetch", self.options.model]
        self._fetch = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        line = []
        while ch := self._fetch.stdout.read(1):  # tqdm redraws with \r: treat it as a line end too
            if ch in "\r\n":
                if line:
                    progress(1, self.STAGES, "".join(line))
                line = []
            else:
                line.append(ch)
        if self._fetch.wait() != 0:
            raise RuntimeError(f"fetching {self.options.model} failed (exit status {self._fetch.returncode}); "
                               "run `tradeoff fetch` to see why")

    def close(self) -> None:
        """Stop the synthetic users and, if this backend made it, the engine. Safe to call twice."""
        self._closed = True
        self._controls.shutdown(wait=True)
        if self._fetch is not None and self._fetch.poll() is None:
            self._fetch.kill()
            self._fetch.wait()
        if self.loadgen is not None:
            self.loadgen.stop()
            self.loadgen = None
        if self.engine is not None and self._owns_engine:
            self.engine.close()

    # ---- readings ----------------------------------------------------------------------------

    @property
    def users(self) -> int:
        return self.loadgen.users if self.loadgen is not None else self.options.users

    def sample(self) -> Sample | None:
        engine = self.engine
        if engine is None or self._closed:
            return None
        now = time.monotonic()
        level_start = self.level_start
        if self.options.connect:  # the server's own numbers: they include the voice loop running there
            level = engine.server_snapshot(now - level_start)
            recent = engine.server_snapshot(RECENT_S)
            if level is None or recent is None:
                return None
        else:
            level = engine.snapshot(now - level_start)
            recent = engine.snapshot(RECENT_S)
        return Sample.from_snapshots(now - self.started, level, recent, self.users, now - level_start,
                                     self.profile.name, self.profile.slo)

    def level(self) -> LevelReading | None:
        """The level that holds now, for the planner; None before the synthetic users exist."""
        loadgen = self.loadgen
        if loadgen is None:
            return None
        steps = self._steps
        return LevelReading(self.level_start, loadgen.submitted[self._level_first:], None if steps is None else steps.samples)

    def workload(self) -> Workload:
        """The active profile's lengths, fitted to the model's context; the users go back to back, as in the sweep
        (the planner adds the profile's think time)."""
        profile = self.profile
        if self.engine is not None and self.engine.max_seq_len:
            profile, _ = profile.fitted(self.engine.max_seq_len)
        return replace(profile.workload, think_time_s=0.0)

    @property
    def foreign(self) -> bool:
        """Is the LLM on a server that is not tradeoff? Its engine state is then what its /metrics tells, if anything."""
        return isinstance(self.engine, RemoteEngine) and not self.engine.tradeoff

    @property
    def where(self) -> str | None:
        """Where the LLM runs, when not in this process, and whose clock the numbers are from."""
        host = urlsplit(self.engine.url).netloc if isinstance(self.engine, RemoteEngine) else None
        if host is None:
            return None
        return f"attached to [b]{host}[/] (its numbers)" if self.options.connect else f"LLM at [b]{host}[/] (timed here)"

    # ---- controls ----------------------------------------------------------------------------

    def long_prompt(self, tokens: int = LONG_PROMPT_TOKENS) -> int:
        """Send one long prompt as a synthetic request (the dashboard's `l`); returns its length in tokens."""
        tokens = min(tokens, (self.engine.max_seq_len or tokens + 16) - 16)
        request = Request(prompt_ids=self.loadgen.prompts.prompt_ids(tokens, random.Random()), user_class="synthetic",
                          sampling=SamplingParams(max_tokens=8, ignore_eos=True))
        self._controls.submit(self.engine.submit, request)  # its stream ends by itself; the numbers count it
        return tokens

    def control(self, controls: Controls) -> None:
        """Apply `controls` on the controls thread; the headline numbers start again from now."""
        def apply() -> None:
            try:
                self.engine.control(controls)  # returns once the backend has applied it
            except Exception as e:
                self.on_error(f"{type(e).__name__}: {e}")
            finally:
                self.controls_applied += 1

        self.controls_sent += 1
        self._controls.submit(apply)
        self._changed()

    def set_users(self, users: int) -> None:
        if self.loadgen is None or users == self.loadgen.users:
            return
        self.loadgen.resize(users)
        self._changed()

    def set_profile(self, profile: Profile) -> None:
        """The synthetic users' next requests take `profile`'s lengths; the SLO follows it."""
        self.profile = profile
        if self.loadgen is not None:
            self.loadgen.workload = self.workload()
        self._changed()

    def _changed(self) -> None:
        self.level_start = time.monotonic()
        self._level_first = len(self.loadgen.submitted) if self.loadgen is not None else 0
        if isinstance(self.engine, Engine):  # the level's own steps: what the planner's model of the engine is fitted to
            self._steps = self.engine.record_steps()
