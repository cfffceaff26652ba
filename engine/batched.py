"""Batched mode: continuous batching over a paged KV cache (which sequences run: engine/scheduler.py).

A step is one forward pass over a ragged batch: the new tokens of every scheduled sequence (one for a
decode, a chunk for a prefill) concatenated into one flat token list with explicit positions, which is
the model's native input; the paged cache is told each sequence's query length, context length and block
table, so attention stays within a sequence. Every sequence whose pending tokens are all computed samples
one token from its own logits row with its own sampling parameters.

On CUDA a step of decodes only replays a CUDA graph for its batch-size bucket (engine/cuda_graph.py) and reads
back the greedy sequences' argmax, computed on the device, once; sampled sequences draw from their logits row on
the device (`verify_on_device`), one readback each. Steps with prefill chunks run eagerly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.cuda_graph import BatchedDecodeGraphs
from engine.kv_cache import PagedKVCache
from engine.loader import LoadedModel
from engine.model import Transformer
from engine.scheduler import BatchPolicy, PagedSeq, Scheduler
from engine.sequence import Sequence
from engine.speculative import choose_tokens

MODE = "batched"
PHASES = ("schedule", "prepare", "forward", "sample", "update")  # the parts of a step, in order


@dataclass
class StepProfile:
    """Where `step` spends its time, summed over steps (bench/sweep.py reports it; replace it to restart)."""

    steps: int = 0
    sequences: int = 0  # summed batch sizes
    tokens: int = 0  # summed tokens per step (decodes + prefill chunks)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    # if a list is given, one entry per step: (rows of one token, i.e. decodes; tokens in longer rows, i.e. prefill
    # chunks; seconds): what a model of the step time is fitted to (serve/queueing.py). None: not kept (it would grow)
    samples: list[tuple[int, int, float]] | None = None


def cuda_dtype() -> torch.dtype:
    """Batched mode's dtype on CUDA (on a CPU it is measured: engine/setup.py)."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def batched_model(loaded: LoadedModel, latency_model: Transformer, latency_quant: str, dtype: torch.dtype) -> Transformer:
    """Batched mode's model: the latency model itself when it computes in `dtype` on full weights (no second copy),
    else the weights loaded again in `dtype`, on the same ops (the fused kernels where latency mode has them). Batched
    mode keeps full weights: int4, latency mode's default on a CPU, runs batch 1 2.6x faster than bf16 but only ties
    at batch 16 and reaches half of bf16's throughput at batch 64 (AVX512_BF16 CPU, 1 thread, forward + logits: 218
    vs 245 and 250 vs 488 tok/s)."""
    if latency_quant == "none" and latency_model.dtype == dtype:
        return latency_model
    model = Transformer(loaded.config, dtype=dtype, device=latency_model.device, kernels=latency_model.kernels)
    model.load_canonical(loaded.weights)
    return model


class BatchedRunner:
    """The runner interface of engine/latency.py (add, has_work, num_waiting, num_running, take_all,
    clear_cache, step) over many sequences at once. cuda_graphs: replay decode-only steps from CUDA graphs on CUDA;
    decode_kernel: the CPU's attention for decode rows (engine/kv_cache.py DECODE_ATTENTION)."""

    def __init__(self, model: Transformer, max_seq_len: int, policy: BatchPolicy | None = None,
                 kv_cache_tokens: int = 16384, block_size: int = 16, prefix_caching: bool = True, cuda_graphs: bool = True,
                 decode_kernel: str = "sdpa"):
        self.model = model
        self.max_seq_len = max_seq_len
        num_blocks = -(-kv_cache_tokens // block_size)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        self.cache = PagedKVCache(model.cfg, num_blocks, block_size, model.dtype, model.device, decode_kernel)
        policy = policy or BatchPolicy()
        self.scheduler = Scheduler(self.blocks, max_seq_len, policy)
        # buckets up to this policy's batch size; a later policy's larger batches run eagerly
        cuda = model.device.type == "cuda"
        self.graphs = BatchedDecodeGraphs(model, self.cache, policy.max_batch_size, max_seq_len) if cuda_graphs and cuda else None
        self.profile = StepProfile()

    # ---- what the engine calls -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def take_all(self) -> list[Sequence]:
        return self.scheduler.take_all()

    def clear_cache(self) -> None:
        self.blocks.clear_prefix_cache()

    def step(self) -> int:
        """One forward pass over the scheduled batch; returns its sequences (0: nothing could be scheduled)."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return 0
        profile = self.profile
        profile.seconds["schedule"] += time.perf_counter() - t0
        self._run(batch)
        t1 = time.perf_counter()
        self.scheduler.remove_finished()
        profile.seconds["update"] += time.perf_counter() - t1
        profile.steps += 1
        profile.sequences += len(batch)
        profile.tokens += sum(n for _, n in batch)
        if profile.samples is not None:
            singles = sum(n == 1 for _, n in batch)
            profile.samples.append((singles, sum(n for _, n in batch if n > 1), time.perf_counter() - t0))
        return len(batch)

    # ---- internals --------------------------------------------------------------------------

    def _run(self, batch: list[tuple[PagedSeq, int]]) -> None:
        """One forward pass over `batch`, then each sampler's token. A pass that raises cannot say whose input broke
        it, so its sequences run again in two halves, and so on down: the one that caused it fails alone and the
        others go on in the same step (a retry rewrites the same cache slots; nothing advanced before the failure)."""
        t0 = time.perf_counter()
        tokens, samplers, ends = self._inputs(batch)
        query_lens, context_lens = [n for _, n in batch], [s.num_computed + n for s, n in batch]
        tables = [s.block_table for s, _ in batch]
        graphed = self.graphs is not None and self.graphs.fits(query_lens, context_lens)
        picks = None  # the greedy token of each sampler, where the device chose it
        try:
            if not graphed:
                positions = self.cache.prepare(query_lens, context_lens, tables)
            t1 = time.perf_counter()
            if graphed:
                logits, best = self.graphs.run(tokens, context_lens, tables)
                logits, picks = logits[ends], best[ends].tolist()  # the step's one readback
            else:
                hidden = self.model(torch.tensor(tokens, device=self.model.device), positions, self.cache)
                logits = self.model.logits(hidden[ends]) if ends else None
        except Exception as e:
            if len(batch) == 1:
                batch[0][0].seq.fail(e)
                return
            half = len(batch) // 2
            self._run(batch[:half])
            self._run(batch[half:])
            return
        t2 = time.perf_counter()
        self.scheduler.advance(batch)
        now = time.monotonic()
        for j, s in enumerate(samplers):
            emit(s.seq, logits[j], now, picks[j] if picks else None, MODE, self.max_seq_len)
        seconds = self.profile.seconds
        for phase, dt in zip(("prepare", "forward", "sample"), (t1 - t0, t2 - t1, time.perf_counter() - t2)):
            seconds[phase] += dt

    def _inputs(self, batch: list[tuple[PagedSeq, int]]) -> tuple[list[int], list[PagedSeq], list[int]]:
        """The step's tokens; the sequences that will have computed all their tokens and sample; their last rows."""
        tokens: list[int] = []
        samplers: list[PagedSeq] = []
        ends: list[int] = []
        for s, n in batch:
            tokens += s.seq.all_ids[s.num_computed:s.num_computed + n]
            if s.num_computed + n == s.num_tokens:
                samplers.append(s)
                ends.append(len(tokens) - 1)
        return tokens, samplers, ends



def emit(seq: Sequence, logits: torch.Tensor, t: float, pick: int | None, mode: str, max_seq_len: int) -> None:
    """Append the token chosen from `logits` [V] (a greedy sequence takes `pick`, its argmax, when given) and end the
    sequence at the context's end. One rule for every runner that samples rows of a step (batched, disaggregated)."""
    try:
        masked = seq.mask_stops(logits[None])  # min_tokens: stop tokens are out, so `pick` is too
        if masked is None and pick is not None and seq.params.greedy:
            token = pick
        else:
            token = choose_tokens([], None, logits[None] if masked is None else masked, seq.params, seq.generator)[0]
        seq.append([token], mode, t, logits[None])
    except Exception as e:  # bad sampling state fails this request only
        seq.fail(e)
    if not seq.finished and len(seq.prompt_ids) + len(seq.output_ids) >= max_seq_len:
        seq.finish("length")
