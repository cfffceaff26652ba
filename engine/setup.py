"""How the engine runs the model on this machine: chosen by measurement where it runs, cached per CPU, shown.

CPUs of one kind differ: an AVX2-only EPYC has no fast bf16 and torch's int4 kernel is slow on it, a newer Xeon
has AVX-512 and AMX and bf16 is its fastest dense format (shared/FACTS.md). A default tuned on one was 4x slower
on the other. So at first start on a machine the engine times this model's own shapes, for about as long as a
model load takes, and picks:

- `decode`: what runs latency mode's decode and verify steps (1 to k+1 rows): the native int4 kernel
  (tradeoff_kernels/native.py: int4 weights, fp32 activations, a whole step in one call), torch's int4 kernel (bf16
  activations), int8, or bf16 or fp32 weights;
- `prefill`: what runs prompt chunks: dense fp32 or bf16 weights (one GEMM per projection), or the native
  kernel in chunks of NATIVE_PREFILL_ROWS;
- `batched`: batched mode's dtype (a step of 16 decodes), fp32 or bf16;
- `attention`: what attends batched (and disaggregated) mode's decode rows: torch's fused SDPA or per-head matmuls
  (engine/kv_cache.py DECODE_ATTENTION), timed on a step of 16 decodes over 256 keys in the chosen dtype;
- `threads`: the native kernel's threads (1, or every core).

A candidate must also keep the model's greedy choices: its top-1 token agrees with the fp32 model's on at least
ACCURACY_BAR of the positions of a teacher-forced reply, else it is not picked however fast it is. The choice is
cached in <cache>/setup/, keyed by the CPU (engine/machine.py, emulation variables included), torch's version,
the model and the native kernel's source; an entry that does not parse or does not match is measured again. An
engine given `quant`/`dtype` uses them instead (the `--quant`/`--dtype` options).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import tradeoff_kernels.native
from engine import native
from engine.kv_cache import DECODE_ATTENTION, PagedKVCache, StaticKVCache
from engine.loader import LoadedModel
from engine.machine import cpu
from engine.model import Transformer
from engine.quant import quantize
from engine.registry import cache_dir

DECODES = ("native", "int4", "int8", "bf16", "fp32")
PREFILLS = ("native", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ACCURACY_BAR = 0.94  # top-1 agreement with fp32 over the teacher-forced positions (int4 measures ~0.98)
NATIVE_PREFILL_ROWS = 16  # a prompt chunk's rows per native call
SCHEMA = 2  # bumped when the cached fields change meaning (2: `attention`)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Setup:
    decode: str  # one of DECODES
    prefill: str  # one of PREFILLS
    batched: str  # fp32 | bf16
    threads: int  # the native kernel's threads
    why: str = ""  # the figures that chose it, one line
    attention: str = "sdpa"  # batched decode rows' attention (unmeasured: sdpa, the faster of both where measured)

    def __post_init__(self) -> None:
        if (self.decode not in DECODES or self.prefill not in PREFILLS or self.batched not in DTYPES or self.threads < 1
                or self.attention not in DECODE_ATTENTION):
            raise ValueError(f"not a setup: {self}")
        if self.decode in DTYPES and self.prefill in DTYPES and self.prefill != self.decode:
            raise ValueError(f"dense {self.decode} decode weights are the prefill weights too, not {self.prefill}")

    @property
    def quant(self) -> str:
        """The weight quantization of latency mode's model."""
        return {"native": "int4", "int4": "int4", "int8": "int8"}.get(self.decode, "none")

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dense weights' dtype (prefill rows; decode rows too for bf16/fp32)."""
        dense = self.decode if self.decode in DTYPES else self.prefill if self.prefill in DTYPES else "fp32"
        return DTYPES[dense]

    def with_decode(self, decode: str) -> Setup:
        """This setup with another decode format (and the prefill that goes with it)."""
        if decode in DTYPES:
            prefill = decode  # dense decode weights are the prefill weights too
        else:
            prefill = "fp32" if self.prefill == "native" and decode != "native" else self.prefill
        return replace(self, decode=decode, prefill=prefill)

    def describe(self) -> str:
        decode = {"native": "int4 native kernel", "int4": "int4 torch kernel"}.get(self.decode, f"{self.decode} weights")
        prefill = "native kernel" if self.prefill == "native" else f"{self.prefill} GEMMs"
        return (f"decode {decode} ({self.threads} thread{'s' * (self.threads > 1)}), prefill {prefill}, "
                f"batched {self.batched} ({self.attention} attention)")


@dataclass(frozen=True)
class Timing:
    """One candidate's figures: seconds per step (median) and greedy agreement with fp32 (None: not measured)."""

    name: str
    seconds: float
    agreement: float | None = None


def pick(timings: list[Timing], bar: float = ACCURACY_BAR) -> Timing:
    """The fastest candidate whose agreement meets `bar` (an unmeasured agreement does not)."""
    good = [t for t in timings if t.agreement is not None and t.agreement >= bar]
    if not good:
        raise ValueError(f"no candidate keeps {bar:.0%} greedy agreement with fp32: {timings}")
    return min(good, key=lambda t: t.seconds)


# ---- the cache ------------------------------------------------------------------------------------------


def cache_key(loaded: LoadedModel) -> dict:
    """What a cached choice is valid for: this CPU (as torch and our kernel see it), torch, the model, the kernel."""
    source = tradeoff_kernels.native.SOURCE
    kernel = hashlib.sha256(source.read_bytes()).hexdigest()[:16] if source.is_file() else None
    return {"schema": SCHEMA, "cpu": cpu().key, "cores": cpu().cores, "torch": torch.__version__,
            "model": f"{loaded.name}|{loaded.folder}|{loaded.config}", "kernel": kernel}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return cache_dir() / "setup" / f"{digest}.json"


def load_cached(key: dict) -> Setup | None:
    """The cached choice for `key`, or None if there is none, it is corrupt, or it was made for something else."""
    try:
        entry = json.loads(cache_path(key).read_text())
        if entry.get("key") != key:
            return None
        names = {f.name for f in fields(Setup)}
        return Setup(**{k: v for k, v in entry["setup"].items() if k in names})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def save(key: dict, setup: Setup) -> Path:
    path = cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    tmp.write_text(json.dumps({"key": key, "setup": asdict(setup)}, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half an entry
    return path


def choose(loaded: LoadedModel, progress: Progress | None = None) -> Setup:
    """The cached setup for this machine and model, or a fresh measurement (then cached)."""
    key = cache_key(loaded)
    if (cached := load_cached(key)) is not None:
        return cached
    say = progress or (lambda line: None)
    say(f"measuring the fastest way to run {loaded.name} on this CPU ({cpu().short()}); once, cached in "
        f"{cache_path(key).parent}")
    setup = measure(loaded, say)
    save(key, setup)
    say(f"chosen: {setup.describe()}")
    return setup


# ---- measurement ----------------------------------------------------------------------------------------

PASSAGE = ("The Industrial Revolution began in Britain in the late eighteenth century. New machines, steam power and "
           "factories changed how goods were made, and towns grew into cities within a generation.")
# a reply to teacher-force (any fluent text will do: the measure is agreement with fp32's top-1 after each token)
REPLY = (" It started in Britain around 1760, when steam engines and new machines moved work from homes into "
         "factories. Towns grew into crowded cities within a generation, wages rose slowly, hours were long, and "
         "the new way of working spread to Europe and America during the next century.")
TIMED_STEPS = 6  # timed decode steps per candidate (after one warm-up)
VERIFY_ROWS = 4  # the shape of a speculative verify step


def measure(loaded: LoadedModel, say: Progress) -> Setup:
    tok = loaded.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": f"Summarise this in one sentence: {PASSAGE}"}])
    ids = prompt + tok.encode(REPLY)
    reference = Transformer(loaded.config, dtype=torch.float32)
    reference.load_canonical(loaded.weights)
    want = teacher_forced(reference, ids, len(prompt))  # fp32's top-1 at every reply position
    cores = max(1, torch.get_num_threads())
    models: dict[str, Transformer] = {"fp32": reference}

    # Decode: time every candidate, then check agreement fastest first; the first that keeps it wins.
    decodes = []
    for name in DECODES:
        model, step = decode_candidate(loaded, name, models, cores)
        if step is not None:
            best = min((t.seconds for t, _, _ in decodes), default=None)
            decodes.append((Timing(name, time_steps(step, model, best)), model, step))
            say(f"  decode {name}: {decodes[-1][0].seconds * 1000:.1f} ms/token")
    decodes.sort(key=lambda d: d[0].seconds)
    checked = []
    for timing, model, step in decodes:
        checked.append(replace(timing, agreement=agreement_of(step, model, ids, len(prompt), want)))
        say(f"  decode {timing.name}: greedy agreement with fp32 {checked[-1].agreement:.3f}")
        if checked[-1].agreement >= ACCURACY_BAR:
            break
    decode = pick(checked)

    threads = cores
    if decode.name == "native" and cores > 1:  # one thread can beat two where waking the second one costs more
        one, step = decode_candidate(loaded, "native", models, 1)
        single = time_steps(step, one)
        say(f"  decode native, 1 thread: {single * 1000:.1f} ms/token")
        threads = 1 if single < decode.seconds else cores

    # Prefill and batched mode: dense formats (the native kernel too, for prompt chunks, when it decodes). A format
    # other than fp32 must keep fp32's greedy choices; that is checked only where it would win.
    prefills = [Timing(name, time_prefill(dense_model(loaded, "fp32" if name == "native" else name, models),
                                          name, prompt, threads), 1.0 if name in ("native", "fp32") else None)
                for name in PREFILLS if name != "native" or decode.name == "native"]
    if decode.name in DTYPES:  # dense decode weights are the prefill weights too
        prefills = [t for t in prefills if t.name in ("native", decode.name)]
    prefill = checked_pick(prefills, lambda name: prefill_agreement(dense_model(loaded, name, models), ids, len(prompt), want))
    batched = [Timing(name, time_batched(dense_model(loaded, name, models)), 1.0 if name == "fp32" else None)
               for name in DTYPES]
    chosen = checked_pick(batched, lambda name: prefill_agreement(dense_model(loaded, name, models), ids, len(prompt), want))
    say("  prefill " + ", ".join(f"{t.name} {len(prompt) / t.seconds:.0f} tok/s" for t in prefills)
        + "; batch of 16: " + ", ".join(f"{t.name} {16 / t.seconds:.0f} tok/s" for t in batched))
    # the same math either way (tests/engine/test_kv_cache.py holds both to plain attention): speed alone decides
    attentions = [Timing(name, time_batched(dense_model(loaded, chosen.name, models), context=256, attention=name))
                  for name in DECODE_ATTENTION]
    attention = min(attentions, key=lambda t: t.seconds)
    say("  batch of 16 over 256 keys: " + ", ".join(f"{t.name} attention {16 / t.seconds:.0f} tok/s" for t in attentions))

    why = "; ".join(["decode ms/token " + ", ".join(f"{t.name} {t.seconds * 1000:.1f}" for t, _, _ in decodes)
                     + " (agreement " + ", ".join(f"{t.name} {t.agreement:.3f}" for t in checked) + ")",
                     "prefill tok/s " + ", ".join(f"{t.name} {len(prompt) / t.seconds:.0f}" for t in prefills),
                     "batch-16 tok/s " + ", ".join(f"{t.name} {16 / t.seconds:.0f}" for t in batched),
                     "at 256 keys " + ", ".join(f"{t.name} {16 / t.seconds:.0f}" for t in attentions)])
    return Setup(decode=decode.name, prefill=prefill.name, batched=chosen.name, threads=threads, why=why,
                 attention=attention.name)


def checked_pick(timings: list[Timing], agreement: Callable[[str], float]) -> Timing:
    """`pick`, measuring the agreement of an unchecked candidate only if it is the fastest."""
    while True:
        fastest = min(timings, key=lambda t: t.seconds)
        if fastest.agreement is not None:
            return pick(timings)
        timings[timings.index(fastest)] = replace(fastest, agreement=agreement(fastest.name))


Step = Callable[[list[int], StaticKVCache, int], torch.Tensor]  # (ids, cache, logit rows) -> logits


def torch_step(model: Transformer) -> Step:
    def step(ids: list[int], cache: StaticKVCache, logit_rows: int) -> torch.Tensor:
        hidden = model(torch.tensor(ids), cache.extend(ids), cache)
        return model.logits(hidden[-logit_rows:])

    return step


def native_step(model: Transformer, threads: int) -> Step | None:
    runner, _ = native.build(model, threads)
    return None if runner is None else runner.forward


def dense_model(loaded: LoadedModel, name: str, models: dict[str, Transformer]) -> Transformer:
    if name not in models:
        model = Transformer(loaded.config, dtype=DTYPES[name], act_dtype=torch.float32)
        model.load_canonical(loaded.weights)
        models[name] = model
    return models[name]


def decode_candidate(loaded: LoadedModel, name: str, models: dict[str, Transformer],
                     threads: int) -> tuple[Transformer | None, Step | None]:
    """The model and step function of one decode candidate (None, None where it cannot run here)."""
    if name in DTYPES:
        model = dense_model(loaded, name, models)
        return model, torch_step(model)
    if name == "native":  # the kernel quantizes the fp32 model's weights itself
        model = dense_model(loaded, "fp32", models)
        step = native_step(model, threads)
        return (model, step) if step is not None else (None, None)
    if name not in models:
        models[name] = latency_model(loaded, Setup(decode=name, prefill="fp32", batched="fp32", threads=threads))
    return models[name], torch_step(models[name])


def latency_model(loaded: LoadedModel, setup: Setup) -> Transformer:
    """Latency mode's model on a CPU, as `setup` says: fp32 activations (no CPU here is faster with bf16 norms and
    attention), int4 quantized from the fp32 weights (so the GGUF's own groups come back exactly) with dense copies
    in the prefill dtype, int8 from bf16 weights (its kernel's fast path), or dense weights."""
    base = {"int4": torch.float32, "int8": torch.bfloat16}.get(setup.quant, setup.weight_dtype)
    model = Transformer(loaded.config, dtype=base, act_dtype=torch.float32)
    model.load_canonical(loaded.weights)
    return quantize(model, setup.quant, dense_dtype=setup.weight_dtype)


def time_steps(step: Step, model: Transformer, best: float | None = None) -> float:
    """Median seconds of a one-token decode step after a short prompt. A candidate whose first steps are far behind
    `best` (the fastest so far) cannot win: it stops after three."""
    cache = StaticKVCache(model.cfg, TIMED_STEPS + 16, model.dtype)
    step(list(range(10, 18)), cache, 1)  # a prompt, and the first (warm-up) step
    times = []
    for i in range(TIMED_STEPS + 1):
        t = time.perf_counter()
        step([100 + i], cache, 1)
        times.append(time.perf_counter() - t)
        if best is not None and len(times) == 4 and statistics.median(times[1:]) > 2.5 * best:
            break
    return statistics.median(times[1:])


def decode_logits(step: Step, model: Transformer, ids: list[int], n_prompt: int) -> torch.Tensor:
    """The logits after each position from the prompt's last one on, the reply run through `step` in verify-sized
    chunks (the shape decode steps have), so the decode path itself is what is measured."""
    cache = StaticKVCache(model.cfg, len(ids), model.dtype)
    rows = [step(ids[:n_prompt], cache, 1)]
    for i in range(n_prompt, len(ids) - 1, VERIFY_ROWS):
        chunk = ids[i:min(i + VERIFY_ROWS, len(ids) - 1)]
        rows.append(step(chunk, cache, len(chunk)))
    return torch.cat(rows)


def agreement_of(step: Step, model: Transformer, ids: list[int], n_prompt: int, want: torch.Tensor) -> float:
    """Top-1 agreement with fp32's tokens `want` over the reply."""
    return (decode_logits(step, model, ids, n_prompt).argmax(-1) == want).float().mean().item()


def teacher_forced(model: Transformer, ids: list[int], n_prompt: int) -> torch.Tensor:
    """The model's top-1 token after each position from the prompt's last one on, in one pass."""
    cache = StaticKVCache(model.cfg, len(ids), model.dtype)
    return torch_step(model)(ids[:-1], cache, len(ids) - n_prompt).argmax(-1)


def prefill_agreement(model: Transformer, ids: list[int], n_prompt: int, want: torch.Tensor) -> float:
    return (teacher_forced(model, ids, n_prompt) == want).float().mean().item()


def time_prefill(model: Transformer, name: str, prompt: list[int], threads: int) -> float:
    """Median seconds of prefilling `prompt` (logits of its last row only)."""
    step = native_step(model, threads) if name == "native" else torch_step(model)
    rows = NATIVE_PREFILL_ROWS if name == "native" else len(prompt)
    times = []
    for _ in range(3):
        cache = StaticKVCache(model.cfg, len(prompt), torch.float32)
        t = time.perf_counter()
        for i in range(0, len(prompt), rows):
            step(prompt[i:i + rows], cache, 1)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def time_batched(model: Transformer, batch: int = 16, context: int = 64, attention: str = "sdpa") -> float:
    """Median seconds of one batched decode step: `batch` sequences of `context` tokens, one new token each."""
    block = 16
    per_seq = -(-context // block)
    cache = PagedKVCache(model.cfg, batch * per_seq, block, model.dtype, decode_kernel=attention)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    times = []
    for _ in range(4):
        positions = cache.prepare([1] * batch, [context] * batch, tables)
        t = time.perf_counter()
        model.logits(model(torch.arange(batch), positions, cache))
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def resolve(loaded: LoadedModel, quant: str | None = None, dtype: torch.dtype | None = None,
            progress: Progress | None = None) -> Setup:
    """The setup to run: this machine's (cached, or measured now), with the user's `quant` (latency mode's weight
    format: none, int8, int4) and `dtype` (the dense weights: prompt chunks, batched mode) imposed. Given both,
    nothing is measured."""
    if quant is not None and dtype is not None:
        decode = "native" if quant == "int4" and tradeoff_kernels.native.available() else "int4"
        base = Setup(decode=decode, prefill="fp32", batched="fp32", threads=max(1, torch.get_num_threads()),
                     why="--quant and --dtype given")
    else:
        base = choose(loaded, progress)
    return impose(base, quant, dtype)


def impose(setup: Setup, quant: str | None, dtype: torch.dtype | None) -> Setup:
    """`setup` with a weight format (`quant`) and a dense dtype (`dtype`) forced, where given."""
    dense = None if dtype is None else next(name for name, d in DTYPES.items() if d == dtype)
    forced = replace(setup, prefill=dense if dense and setup.prefill != "native" else setup.prefill,
                     batched=dense or setup.batched)
    decode = setup.decode
    if quant == "none":
        decode = dense or (decode if decode in DTYPES else "fp32")
    elif quant == "int8":
        decode = "int8"
    elif quant == "int4" and decode not in ("native", "int4"):
        decode = "native" if tradeoff_kernels.native.available() else "int4"
    elif quant is None and dense is not None and decode in DTYPES:
        decode = dense
    forced = forced.with_decode(decode)
    if forced == setup:
        return setup
    return replace(forced, why=f"{setup.why}; --quant/--dtype imposed")
