"""Synthetic users: the load that shares batched mode with the real user, and drives the sweep.

Closed loop: N concurrent users, each sending a request, reading its stream to the end, thinking for an
exponentially distributed pause, and going again. Open loop (`start_rate`): requests arrive as a Poisson
stream. Prompt and output lengths are drawn from normal
distributions clipped to a range (the shape GuideLLM's synthetic data uses); a prompt of a drawn length is
one of the built-in questions after enough sentences of a built-in passage, in the model's chat template.
Users run as tasks on a private asyncio loop in a background thread, so `start`, `resize` and `stop`
can be called from any thread while the engine runs.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from engine.backend import Backend
from engine.engine import OverloadedError
from engine.metrics import RequestMetrics
from engine.sampling import SamplingParams
from engine.sequence import EngineError, Request
from engine.tokenizer import Tokenizer
from serve.background import BackgroundLoop

QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while working.",
    "Explain in two sentences why the sky is blue.",
    "Summarise the text above in one paragraph.",
    "What are the main causes described above?",
    "Write a short poem about the sea.",
    "How do I make a cup of tea?",
    "List five animals that live in the desert.",
)
PASSAGE = (
    "The Industrial Revolution began in Britain in the late eighteenth century. New machines, steam power and "
    "factories changed how goods were made. Cotton spinning, once done by hand at home, moved into mills beside "
    "rivers and later beside coal fields. Canals and then railways carried raw materials and finished goods across "
    "the country. Towns grew into cities within a generation, and many families left farms for factory work. "
    "Wages rose slowly, but hours were long and conditions were often dangerous. Children worked in mines and mills "
    "until new laws limited their hours. Engineers improved the steam engine, making it smaller and more efficient. "
    "Iron and later steel replaced wood in bridges, ships and buildings. The revolution spread to Belgium, France, "
    "Germany and the United States during the nineteenth century. Output per worker grew as never before, and over "
    "time living standards rose. Crowded housing, polluted air and dirty water also came with the new cities. "
    "Reformers campaigned for sanitation, schooling and the right of workers to organise. Historians still debate "
    "why the change began in Britain: coal, colonies, capital, patents and cheap energy all played a part."
)
SENTENCES = tuple(s.strip() + "." for s in PASSAGE.split(". ") if s.strip())
MAX_BACKOFF_S = 1.0  # an overloaded engine is retried after at most this long


@dataclass(frozen=True)
class Lengths:
    """Token counts ~ Normal(mean, stdev) rounded and clipped to [lo, hi]; stdev 0 gives `mean` every time."""

    mean: int
    stdev: float = 0.0
    lo: int = 1
    hi: int = 8192

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.mean <= self.hi or self.stdev < 0:
            raise ValueError(f"need 1 <= lo <= mean <= hi and stdev >= 0, got {self}")

    def sample(self, rng: random.Random) -> int:
        return min(self.hi, max(self.lo, round(rng.gauss(self.mean, self.stdev)))) if self.stdev else self.mean


@dataclass(frozen=True)
class Measured:
    """Lengths drawn from measured values, uniformly with replacement (the same interface as Lengths)."""

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.values or min(self.values) < 0:
            raise ValueError("measured lengths need at least one value, none negative")

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    def sample(self, rng: random.Random) -> int:
        return self.values[rng.randrange(len(self.values))]


@dataclass(frozen=True)
class Workload:
    prompt_tokens: Lengths | Measured = field(default_factory=lambda: Lengths(128, 48, 24, 512))
    output_tokens: Lengths | Measured = field(default_factory=lambda: Lengths(64, 24, 8, 256))
    think_time_s: float = 1.0  # closed loop: mean pause between a user's requests (exponential; 0 = none)


class PromptSet:
    """Chat prompts of about a requested number of tokens, from the built-in questions and passage."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.question_tokens = [len(tokenizer.encode_chat([{"role": "user", "content": q}])) for q in QUESTIONS]
        self.sentence_tokens = [len(tokenizer.encode(" " + s)) for s in SENTENCES]

    def prompt_ids(self, n_tokens: int, rng: random.Random) -> list[int]:
        return self.tokenizer.encode_chat(self.messages(n_tokens, rng))

    def messages(self, n_tokens: int, rng: random.Random) -> list[dict]:
        """A question after passage sentences (from a random one on, wrapping around) up to ~n_tokens in all."""
        q = rng.randrange(len(QUESTIONS))
        i = rng.randrange(len(SENTENCES))
        total, parts = self.question_tokens[q], []
        while total + self.sentence_tokens[i % len(SENTENCES)] <= n_tokens:
            parts.append(SENTENCES[i % len(SENTENCES)])
            total += self.sentence_tokens[i % len(SENTENCES)]
            i += 1
        content = " ".join(parts) + "\n\n" + QUESTIONS[q] if parts else QUESTIONS[q]
        return [{"role": "user", "content": content}]


class LoadGenerator:
    """Synthetic users ("synthetic" class in the metrics) against `engine`, started, resized and stopped at run time.
    `users` is the one record of how many there are (the dashboard reads it from here)."""

    def __init__(self, engine: Backend, workload: Workload | None = None, seed: int = 0):
        if engine.tokenizer is None:
            raise ValueError("synthetic users need the model's tokenizer to size their prompts (give --model)")
        self.engine = engine
        self.workload = workload or Workload()
        self.prompts = PromptSet(engine.tokenizer)
        self.rng = random.Random(seed)
        self.submitted: list[RequestMetrics] = []  # every request sent, in order
        self.completed: list[RequestMetrics] = []  # those that ran to their end (stop or length)
        self.rejected = 0  # refused as overloaded (then retried after a pause)
        self.failed = 0
        self.users = 0  # wanted now; the users' tasks follow on the loop
        self.rate: float | None = None  # open loop (start_rate): requests/s; None while closed-loop or stopped
        self._tasks: list[asyncio.Task] = []
        self._bg: BackgroundLoop | None = None

    # ---- control (any thread) ----------------------------------------------------------------

    def start(self, users: int) -> None:
        """N concurrent users, each with one request in flight at a time."""
        if self._bg is not None:
            raise RuntimeError("the load generator is already running; stop it first")
        self._bg = BackgroundLoop("loadgen")
        self.resize(users)

    def start_rate(self, rate: float, requests: int | None = None) -> None:
        """Open loop: requests arrive as a Poisson stream of `rate` per second, however many are in flight (what a
        deployment sees; bench/plan_check.py checks the planner's rates with it). With `requests`, arrivals stop
        after that many and the last ones run to their end."""
        if not rate > 0:
            raise ValueError(f"the request rate must be > 0, got {rate}")
        if self._bg is not None:
            raise RuntimeError("the load generator is already running; stop it first")
        self._bg = BackgroundLoop("loadgen")
        self.rate = rate
        self._bg.loop.call_soon_threadsafe(lambda: self._tasks.append(self._bg.loop.create_task(self._arrivals(rate, requests))))

    def resize(self, users: int) -> None:
        """A new number of users; leaving users cancel their request. Returns at once (the loop applies it)."""
        if users < 0:
            raise ValueError(f"the number of synthetic users must be >= 0, got {users}")
        if self._bg is None:
            raise RuntimeError("the load generator is not running; start it first")
        if self.rate is not None:
            raise RuntimeError("the load is an open-loop rate (start_rate): it has no users to resize; stop it first")
        self.users = users
        self._bg.loop.call_soon_threadsafe(self._follow)

    def stop(self) -> None:
        """Stop every user and cancel their requests in flight."""
        if self._bg is None:
            return
        self._bg.run(self._cancel_all())
        self._bg.stop()
        self._bg = None
        self.rate = None

    # ---- on the private loop -----------------------------------------------------------------

    def _follow(self) -> None:
        """Start or cancel user tasks until there are `users` of them."""
        while len(self._tasks) < self.users:
            self._tasks.append(self._bg.loop.create_task(self._user()))
        while len(self._tasks) > self.users:
            self._tasks.pop().cancel()

    async def _cancel_all(self) -> None:
        """Cancel every user and wait until each has ended (its request cancelled on the way out)."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _user(self) -> None:
        while True:
            await self._request()
            if self.workload.think_time_s:
                await asyncio.sleep(self.rng.expovariate(1 / self.workload.think_time_s))

    async def _arrivals(self, rate: float, requests: int | None) -> None:
        in_flight: set[asyncio.Task] = set()
        try:
            arrived = 0
            while requests is None or arrived < requests:
                await asyncio.sleep(self.rng.expovariate(rate))
                task = asyncio.get_running_loop().create_task(self._request())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                arrived += 1
            await asyncio.gather(*in_flight)  # all arrived: the last ones run to their end
        finally:  # stopped: the requests in flight are cancelled with it
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _request(self) -> None:
        w = self.workload
        messages = self.prompts.messages(w.prompt_tokens.sample(self.rng), self.rng)
        sampling = SamplingParams(max_tokens=w.output_tokens.sample(self.rng), ignore_eos=True)
        try:
            stream = self.engine.submit(Request(messages=messages, sampling=sampling, user_class="synthetic"),
                                        asyncio.get_running_loop())
            self.submitted.append(stream.metrics)
            async for _ in stream:
                pass
        except OverloadedError:  # from `submit`, or through the stream from a remote server
            self.rejected += 1
            await asyncio.sleep(self.rng.uniform(0.5, 1.0) * MAX_BACKOFF_S)
            return
        except EngineError:
            self.failed += 1
            return
        if stream.metrics.finish_reason in ("stop", "length"):
            self.completed.append(stream.metrics)
