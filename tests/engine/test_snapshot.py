"""The typed snapshot: its JSON form round-trips, and a peer's JSON with a missing or mistyped field is refused
rather than half-read."""

import time

import pytest

from engine.metrics import RequestMetrics
from engine.snapshot import EngineState, KVCache, Snapshot, Speculation, Workers, field_paths
from engine.stats import RollingStats


def snapshot() -> Snapshot:
    stats = RollingStats(window_s=10)
    t0 = time.monotonic()
    m = RequestMetrics(arrival=t0, user_class="synthetic", finish_reason="stop")
    m.emissions = [(t0 + 0.1, 1, "batched"), (t0 + 0.15, 2, "batched")]
    stats.track(m)
    state = EngineState(mode="batched", running=3, waiting=1, max_batch_size=32, chunked_prefill=True, can_speculate=True,
                        speculation=Speculation("auto", steps=9, drafted=20, accepted=11, emitted=20),
                        kv=KVCache(blocks_used=5, blocks_free=95, preemptions=0, prefix_cached_tokens=48), setup="int4",
                        workers=Workers(prefill_kv=KVCache(2, 98, 0, 32), decode_kv=KVCache(7, 93, 1, 0), in_transit=1,
                                        handoffs=4, handoff_bytes=3_000_000, handoff_s=0.004, restarts=0, prefill_threads=1,
                                        decode_threads=1),
                        note="disaggregated mode stopped")
    return Snapshot(stats.window(now=t0 + 1), state)


def test_the_json_form_round_trips():
    snap = snapshot()
    assert Snapshot.from_json(snap.to_json()) == snap
    assert snap.stats.synthetic.finished == 1 and snap.stats.synthetic.ttft_s.p50 == pytest.approx(0.1)
    assert snap.state.kv.used == pytest.approx(0.05)
    # what a remote server cannot tell is None, and survives the trip as None
    unknown = Snapshot(snap.stats, EngineState("latency", 0, 0, 1, None, False, None, None))
    assert Snapshot.from_json(unknown.to_json()) == unknown


@pytest.mark.parametrize("path, value", [("state.running", "3"), ("state.running", True), ("state.mode", None),
                                         ("stats.user.ttft_s", [1]), ("state.kv", 5)])
def test_a_mistyped_field_is_refused(path, value):
    data = snapshot().to_json()
    *parents, leaf = path.split(".")
    node = data
    for name in parents:
        node = node[name]
    node[leaf] = value
    with pytest.raises((TypeError, ValueError)):
        Snapshot.from_json(data)


def test_a_missing_field_is_refused():
    data = snapshot().to_json()
    del data["stats"]["all"]["finished"]
    with pytest.raises(KeyError, match="finished"):
        Snapshot.from_json(data)


def test_field_paths_name_every_leaf_once():
    paths = field_paths()
    assert len(paths) == len(set(paths))
    assert {"stats.user.ttft_s.p99", "stats.window_s", "state.kv.blocks_used", "state.speculation.drafter",
            "state.setup", "state.workers.decode_kv.blocks_used", "state.workers.in_transit"} <= set(paths)

    def leaves(obj, prefix=""):
        if isinstance(obj, dict):
            return [p for k, v in obj.items() for p in leaves(v, f"{prefix}{k}.")]
        return [prefix[:-1]]

    assert leaves(snapshot().to_json()) == paths
