"""The engine's subcommands of `tradeoff` (fetch, generate, chat) and the options every command that runs a model
takes (--model, --quant, --spec, --backend, sampling), with `backend_from`, which turns them into a `Backend`."""

from __future__ import annotations

import argparse
import json
import os
import sys

from engine import Backend, Engine, Request, SamplingParams
from engine.backend import MODES
from engine.engine import CUDA_PATHS
from engine.loader import EXPECTED, load_tokenizer
from engine.metrics import RequestMetrics
from engine.quant import QUANT_MODES
from engine.registry import DEFAULT_MODEL, REGISTRY, fetch
from engine.setup import DTYPES
from engine.speculative import SPEC_MODES
from serve.remote import RemoteEngine

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Give me three tips for staying focused while working.",
    "Explain in two sentences why the sky is blue.",
)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to run: {EXPECTED} (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quant", choices=QUANT_MODES, default=None,
                   help="latency mode's weight format (default on a CPU: measured on this machine at first start and "
                        "cached, see `tradeoff setup`; none on a GPU, where int4 runs the Triton W4A16 kernel)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="dense weights: prompt chunks and batched mode (default on a CPU: measured, as --quant)")
    p.add_argument("--cuda-path", choices=CUDA_PATHS, default=CUDA_PATHS[0],
                   help="on a GPU, how decode steps run: graphs (the Triton kernels of tradeoff_kernels/, replayed from CUDA "
                        "graphs; default), compile (plain PyTorch ops under torch.compile, reduce-overhead), eager")
    p.add_argument("--mode", choices=MODES, default="latency",
                   help="how requests run: latency (batch 1, speculative decoding; default), batched (continuous "
                        "batching), disaggregated (a prefill worker and a decode worker process, the prompt's KV cache "
                        "handed over through shared memory); the dashboard's `b` and POST /v1/tradeoff/control switch live")
    p.add_argument("--disagg-threads", type=int_pair, default=(1, 1), metavar="PREFILL,DECODE",
                   help="disaggregated mode's threads for its prefill and decode workers (default: 1,1)")
    p.add_argument("--spec", choices=SPEC_MODES, default="auto",
                   help="speculative decoding: off, ngram (prompt lookup), draft (a draft model), auto (both; default)")
    p.add_argument("--draft", default=None,
                   help="draft model for --spec draft/auto: a trained draft .safetensors or any model sharing the "
                        "tokenizer (default: the committed trained draft of the default model)")
    add_backend_args(p)


def add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default=None, metavar="URL",
                   help="use an OpenAI-compatible server instead of running the model here: openai://HOST:PORT/v1 "
                        "(vLLM, SGLang, llama.cpp's server, another `tradeoff serve`; openai+https:// for TLS). "
                        "TTFT/TBT/E2E are then measured here, from its stream; --model only sizes synthetic prompts")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the --backend's API key, if it needs one (default: %(default)s)")
    p.add_argument("--backend-model", default=None, metavar="NAME",
                   help="model name at the --backend (default: the first one its /v1/models lists)")


def backend_from(args: argparse.Namespace, **options) -> Backend:
    """The in-process engine, or with --backend the remote one."""
    if args.backend:
        return remote_from(args, **options)
    return Engine(args.model, device=args.device, quant=args.quant, dtype=DTYPES.get(args.dtype), spec=args.spec,
                  draft=args.draft, cuda_path=args.cuda_path, mode=args.mode, disagg_threads=args.disagg_threads,
                  progress=say, **options)


def int_pair(text: str) -> tuple[int, int]:
    """'1,1' -> (1, 1): two integers of at least 1, such as a pair of thread counts (argparse reports the error)."""
    try:
        pair = tuple(int(x) for x in text.split(","))
    except ValueError:
        pair = ()
    if len(pair) != 2 or min(pair) < 1:
        raise argparse.ArgumentTypeError(f"expected two integers of at least 1 separated by a comma, such as 1,1; got {text!r}")
    return pair


def say(line: str) -> None:
    """Progress of long work (the first measurement of this machine's setup) on stderr."""
    print(line, file=sys.stderr, flush=True)


def remote_from(args: argparse.Namespace, **options) -> RemoteEngine:
    return RemoteEngine(args.backend, api_key=os.environ.get(args.api_key_env), model=args.backend_model,
                        tokenizer=load_tokenizer(args.model), **options)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int = 256) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, for reproducible output")


def sampling_from(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed)


def configure(name: str, p: argparse.ArgumentParser, argv: list[str]) -> None:
    """Fill in the parser of `tradeoff NAME` (fetch, generate or chat)."""
    if name == "fetch":
        p.description = "Fetch a registry model into the user cache and convert it once, so later starts take seconds."
        p.add_argument("model", nargs="?", default=DEFAULT_MODEL, choices=sorted(REGISTRY))
        p.set_defaults(func=cmd_fetch)
    elif name == "setup":
        p.description = ("How the engine runs the model on this CPU (weight format and kernel of decode steps, prompt "
                         "chunks, batched mode's dtype, threads): measured at the first start on a machine and cached "
                         "per CPU, torch version and model. This shows the choice and the figures behind it.")
        p.add_argument("--model", default=DEFAULT_MODEL, help=f"model: {EXPECTED} (default: %(default)s)")
        p.add_argument("--remeasure", action="store_true", help="measure again, replacing the cached choice")
        p.set_defaults(func=cmd_setup)
    elif name == "generate":
        p.description = "Stream the model's reply to one chat message, then print TTFT and TBT."
        p.add_argument("prompt", help="the user message (wrapped in the model's chat template)")
        p.add_argument("--raw", action="store_true", help="send the prompt as raw text, without the chat template")
        p.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, metrics) instead")
        add_model_args(p)
        add_sampling_args(p)
        p.set_defaults(func=cmd_generate)
    elif name == "chat":
        p.description = "Chat with the model; each reply shows its TTFT and TBT. --demo plays built-in questions."
        p.add_argument("--demo", action="store_true", help="ask a few built-in questions instead of reading stdin")
        p.add_argument("--system", default=None, help="system prompt (default: the model template's own)")
        add_model_args(p)
        add_sampling_args(p, max_tokens=200)
        p.set_defaults(func=cmd_chat)


def cmd_fetch(args: argparse.Namespace) -> int:
    from engine.loader import gguf_folder

    path = fetch(args.model)
    folder = gguf_folder(path)  # converts and caches the weights on first run only
    print(f"{args.model}: {path} (weights cached in {folder})")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    from engine import setup
    from engine.loader import load
    from engine.machine import cpu

    loaded = load(args.model)
    key = setup.cache_key(loaded)
    if args.remeasure:
        setup.cache_path(key).unlink(missing_ok=True)
    chosen = setup.choose(loaded, say)
    print(f"{loaded.name} on {cpu().short()}:\n  {chosen.describe()}\n  measured: {chosen.why}\n"
          f"  cached in {setup.cache_path(key)} (--quant/--dtype override it; --remeasure measures again)")
    return 0


def format_metrics(m: RequestMetrics) -> str:
    s = m.summary()

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms"

    tps = f"{1 / s['tpot_s']:.1f} tok/s" if s["tpot_s"] else "-"
    return (f"[{s['prompt_tokens']} prompt + {s['output_tokens']} output tokens | TTFT {ms(s['ttft_s'])} | "
            f"TBT p50 {ms(s['itl_p50_s'])} p99 {ms(s['itl_p99_s'])} | {tps} | {s['finish_reason']}]")


def cmd_generate(args: argparse.Namespace) -> int:
    engine = backend_from(args)
    req = Request(prompt=args.prompt) if args.raw else Request(messages=[{"role": "user", "content": args.prompt}])
    req.sampling = sampling_from(args)
    stream = engine.submit(req)
    text, ids = [], []
    for ev in stream:
        text.append(ev.text)
        ids += ev.token_ids
        if not args.json:
            print(ev.text, end="", flush=True)
    if args.json:  # token ids are empty from a --backend: the server sends text
        why = engine.setup.why if isinstance(engine, Engine) and engine.setup is not None else None
        print(json.dumps({"model": engine.name, "setup": engine.snapshot().state.setup, "setup_why": why,
                          "text": "".join(text), "token_ids": ids, "metrics": stream.metrics.summary()}))
    else:
        print("\n" + format_metrics(stream.metrics), file=sys.stderr)
    engine.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = backend_from(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = not args.demo and sys.stdin.isatty()
    questions = iter(DEMO_QUESTIONS) if args.demo else None
    print(f"tradeoff chat: {engine.describe()}. "
          + ("Ctrl-D to quit." if interactive else ""), file=sys.stderr)
    while True:
        if questions is not None:
            text = next(questions, None)
            if text is None:
                break
            print(f"\nyou> {text}")
        else:
            try:
                text = input("\nyou> " if interactive else "")
            except EOFError:
                break
            if not text.strip():
                continue
        history.append({"role": "user", "content": text})
        stream = engine.submit(Request(messages=history, sampling=sampling_from(args)))
        print("bot> ", end="", flush=True)
        reply = []
        for ev in stream:
            reply.append(ev.text)
            print(ev.text, end="", flush=True)
        print("\n     " + format_metrics(stream.metrics))
        history.append({"role": "assistant", "content": "".join(reply)})
    engine.close()
    return 0
