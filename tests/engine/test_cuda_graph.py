"""The CUDA-graph decode step (engine/cuda_graph.py): its graph-safe static step equals the eager path on the CPU
(prefill, decode steps, padded speculative verification, truncation of rejected drafts, across context windows),
Batched mode's graph-safe decode step equals the eager batched step (padded batches, block boundaries, padding rows
that leave the cache alone), and a runner using it emits the same tokens. The capture itself is checked only where
CUDA exists."""

import pytest
import torch

from engine import Engine, Request, SamplingParams
from engine.batched import BatchedRunner
from engine.cuda_graph import MIN_WINDOW, BatchedDecodeGraphs, DecodeGraphs
from engine.kv_cache import PagedKVCache, StaticKVCache
from engine.latency import LatencyRunner
from engine.model import Transformer
from engine.scheduler import BatchPolicy
from engine.sequence import Sequence, Stream

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

PROMPT_LEN = 250
CACHE_LEN = 300  # windows: 256 while the sequence fits it, then the whole cache
# (tokens to run, accepted length to truncate back to afterwards or None): decode steps, a verification of k + 1 = 4
# rows with two drafts rejected, one of 3 rows (padded to 4) that crosses into the second window, more decode steps
SCRIPT = [([5], None), ([17], None), ([3, 9, 11, 2], 254), ([8, 1, 4], 255), ([7], None), ([6, 6], 257), ([40], None)]


def tiny_model(tiny_loaded, device: str = "cpu") -> Transformer:
    model = Transformer(tiny_loaded.config, dtype=torch.float32, device=device)
    model.load_canonical(tiny_loaded.weights)
    return model


def eager(model: Transformer, cache: StaticKVCache, ids: list[int]) -> torch.Tensor:
    """The latency runner's eager forward: logits [len(ids), V]."""
    return model.logits(model(torch.tensor(ids, device=model.device), cache.extend(ids), cache))


def run_script(model: Transformer, graphs_for) -> tuple[list[torch.Tensor], list[torch.Tensor], DecodeGraphs, list[bool]]:
    """Prefill eagerly into two caches, then run SCRIPT eagerly on one and through DecodeGraphs on the other."""
    prompt = torch.randint(0, model.cfg.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = StaticKVCache(model.cfg, CACHE_LEN, torch.float32, model.device)
    cache = StaticKVCache(model.cfg, CACHE_LEN, torch.float32, model.device)
    eager(model, ref, prompt)
    eager(model, cache, prompt)
    graphs = graphs_for(cache)
    want, got, ready = [], [], []
    for ids, keep in SCRIPT:
        assert graphs.fits(len(ids))
        ready.append(graphs.ready(len(ids)))
        want.append(eager(model, ref, ids))
        logits, best = graphs.run(ids)
        assert torch.equal(best, logits.argmax(dim=-1))
        got.append(logits)
        assert cache.length == ref.length and cache.ids == ref.ids
        if keep is not None:
            ref.truncate(keep)
            cache.truncate(keep)
    return want, got, graphs, ready


def test_static_step_equals_the_eager_path(tiny_loaded):
    model = tiny_model(tiny_loaded)
    want, got, graphs, ready = run_script(model, lambda cache: DecodeGraphs(model, cache, max_rows=7, capture=False))
    for w, g in zip(want, got):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    # the script exercised the padded verification and both context windows
    assert set(graphs._steps) == {(1, MIN_WINDOW), (4, MIN_WINDOW), (4, CACHE_LEN), (2, CACHE_LEN), (1, CACHE_LEN)}
    assert ready == [False, True, False, False, True, False, False]  # shapes seen before


def test_steps_that_no_graph_covers_are_left_to_the_eager_path(tiny_loaded):
    model = tiny_model(tiny_loaded)
    cache = StaticKVCache(model.cfg, 20, torch.float32)
    graphs = DecodeGraphs(model, cache, max_rows=7, capture=False)
    assert graphs.fits(8) and not graphs.fits(9)  # rows are padded to 8
    eager(model, cache, list(range(14)))
    assert graphs.fits(4) and not graphs.fits(5)  # 14 + 8 padded rows would overrun the cache
    assert LatencyRunner(model, 64).graphs is None  # the CPU keeps its eager path


# ---- batched mode ----------------------------------------------------------------------------------------------

BLOCK = 4
BATCH_LENS = [5, 11, 14]  # prompt lengths; 6 decode steps take them across block boundaries (8; 12, 16; 16)
# scattered blocks; block 0, which padding rows read, holds positions 4-7 of the first sequence, and 18, 19 stay unused
BATCH_TABLES = [[3, 0, 7, 9, 12, 15], [1, 8, 2, 10, 13, 16], [4, 6, 5, 11, 14, 17]]


def run_batched_script(model: Transformer, graphs_for) -> tuple[list[torch.Tensor], list[torch.Tensor], BatchedDecodeGraphs]:
    """Prefill three sequences eagerly into one paged cache and copy it; then decode them eagerly on one cache and
    through BatchedDecodeGraphs on the other: 6 steps of all three (padded to 4), then 2 without the middle one."""
    dev = model.device
    ref = PagedKVCache(model.cfg, 20, BLOCK, torch.float32, dev)
    g = torch.Generator().manual_seed(2)
    for n, table in zip(BATCH_LENS, BATCH_TABLES):
        ids = torch.randint(0, model.cfg.vocab_size, (n,), generator=g).to(dev)
        model(ids, ref.prepare([n], [n], [table]), ref)
    cache = PagedKVCache(model.cfg, 20, BLOCK, torch.float32, dev)
    cache.k.copy_(ref.k)
    cache.v.copy_(ref.v)
    graphs = graphs_for(cache)
    lens, tables = list(BATCH_LENS), list(BATCH_TABLES)
    want, got = [], []
    for step in range(8):
        if step == 6:
            del lens[1], tables[1]
        lens = [n + 1 for n in lens]
        ids = torch.randint(0, model.cfg.vocab_size, (len(lens),), generator=g).tolist()
        assert graphs.fits([1] * len(lens), lens)
        want.append(model.logits(model(torch.tensor(ids, device=dev), ref.prepare([1] * len(lens), lens, tables), ref)))
        logits, best = graphs.run(ids, lens, tables)
        assert torch.equal(best, logits.argmax(dim=-1))
        got.append(logits)
        # the padding rows wrote nowhere: every block, used or not, holds what the eager step left there
        torch.testing.assert_close(cache.k, ref.k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.v, ref.v, atol=1e-5, rtol=1e-5)
    return want, got, graphs


def test_batched_static_step_equals_the_eager_batched_step(tiny_loaded):
    model = tiny_model(tiny_loaded)
    want, got, graphs = run_batched_script(model, lambda cache: BatchedDecodeGraphs(model, cache, 3, 32, capture=False))
    for w, g in zip(want, got):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert set(graphs._steps) == {4, 2}  # three rows padded to 4, then two


def test_batched_steps_that_no_graph_covers_are_left_to_the_eager_path(tiny_loaded):
    model = tiny_model(tiny_loaded)
    graphs = BatchedDecodeGraphs(model, PagedKVCache(model.cfg, 20, BLOCK, torch.float32), 3, 32, capture=False)
    assert graphs.fits([1] * 4, [5, 6, 7, 32])  # 3 sequences round up to a bucket of 4
    assert not graphs.fits([1] * 5, [5] * 5)  # more than the largest bucket
    assert not graphs.fits([1, 3, 1], [5, 6, 7])  # a prefill chunk
    assert not graphs.fits([1], [33])  # longer than the block tables hold
    assert BatchedRunner(model, 64).graphs is None  # the CPU keeps its eager path


def test_batched_runner_emits_the_same_tokens_through_the_static_step(tiny_loaded):
    """Greedy sequences take the device's argmax, a sampled one still samples its logits row: both as eagerly."""
    model = tiny_model(tiny_loaded)
    outputs = []
    for graphed in (False, True):
        runner = BatchedRunner(model, 64, BatchPolicy(max_batch_size=4, token_budget=16), kv_cache_tokens=256, block_size=BLOCK)
        if graphed:
            runner.graphs = BatchedDecodeGraphs(model, runner.cache, 4, 64, capture=False)
        seqs = []
        for i, (n, max_tokens) in enumerate([(3, 12), (9, 5), (14, 9), (6, 7), (21, 10)]):
            sampling = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=1.0 if i == 2 else 0.0, seed=7)
            ids = list(range(10 + i, 10 + i + n))
            seqs.append(Sequence(Stream(Request(prompt_ids=ids, sampling=sampling), None), ids, tiny_loaded.tokenizer))
            runner.add(seqs[-1])
        while runner.has_work():
            runner.step()
        outputs.append([s.output_ids for s in seqs])
        if graphed:
            assert set(runner.graphs._steps) >= {4, 2, 1}  # five sequences, four at a time, ending at different steps
    assert outputs[0] == outputs[1]
    assert all(len(out) == n for out, n in zip(outputs[0], [12, 5, 9, 7, 10]))


# ---- on a GPU ----------------------------------------------------------------------------------------------------


@needs_cuda
def test_graph_replay_equals_the_eager_step(tiny_loaded):
    model = tiny_model(tiny_loaded, "cuda")
    static, _, _, _ = run_script(model, lambda cache: DecodeGraphs(model, cache, max_rows=7, capture=False))
    want, got, graphs, _ = run_script(model, lambda cache: DecodeGraphs(model, cache, max_rows=7))
    for w, s, g in zip(want, static, got):
        torch.testing.assert_close(g, s, atol=1e-5, rtol=1e-5)  # the same kernels, replayed
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert len(graphs._steps) == 5


@needs_cuda
def test_batched_graph_replay_equals_the_eager_step(tiny_loaded):
    model = tiny_model(tiny_loaded, "cuda")
    _, static, _ = run_batched_script(model, lambda cache: BatchedDecodeGraphs(model, cache, 3, 32, capture=False))
    want, got, graphs = run_batched_script(model, lambda cache: BatchedDecodeGraphs(model, cache, 3, 32))
    for w, s, g in zip(want, static, got):
        torch.testing.assert_close(g, s, atol=1e-5, rtol=1e-5)  # the same kernels, replayed
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert set(graphs._steps) == {4, 2}


@needs_cuda
def test_engine_batched_greedy_output_is_the_same_with_graphs_on_and_off(default_model):
    prompts = ["What is the capital of France?", "Write a haiku about the sea.", "List five fruits that are red.",
               "Repeat after me: one two three four five six seven eight nine ten.", "How many legs does a spider have?"]
    outputs = []
    for graphs in (False, True):
        engine = Engine(default_model, device="cuda", dtype=torch.float32, quant="none", spec="off", mode="batched",
                        policy=BatchPolicy(max_batch_size=4), cuda_path="graphs" if graphs else "eager")
        try:
            streams = [engine.submit(Request(messages=[{"role": "user", "content": p}], sampling=SamplingParams(max_tokens=48)))
                       for p in prompts]
            outputs.append([[t for ev in s for t in ev.token_ids] for s in streams])
            assert (engine._batched.graphs is not None) == graphs
            if graphs:
                assert engine._batched.graphs._steps  # decode steps did replay graphs
        finally:
            engine.close()
    assert outputs[0] == outputs[1]


@needs_cuda
@pytest.mark.parametrize("spec", ["off", "ngram"])
def test_engine_greedy_output_is_the_same_with_graphs_on_and_off(default_model, spec):
    prompts = ["What is the capital of France?", "Repeat after me: one two three four five six seven eight nine ten."]
    outputs = []
    for graphs in (False, True):
        engine = Engine(default_model, device="cuda", dtype=torch.float32, quant="none", spec=spec,
                        cuda_path="graphs" if graphs else "eager")
        try:
            outputs.append([engine.generate(Request(messages=[{"role": "user", "content": p}],
                                                    sampling=SamplingParams(max_tokens=64))).token_ids for p in prompts])
            assert (engine._latency.graphs is not None) == graphs
            if graphs:
                assert engine._latency.graphs._steps  # the decode steps did replay graphs
        finally:
            engine.close()
    assert outputs[0] == outputs[1]
