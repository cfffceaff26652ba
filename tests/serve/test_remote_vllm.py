"""A server that is not tradeoff, read through its Prometheus /metrics in vLLM's names: the recorded text of a real
vLLM (tests/serve/data/, the header says which version and how it was taken) gives the engine state, a
RemoteEngine on a fake server that serves it reports that state, and a text without those series (or not
Prometheus at all) leaves the fields None, never an error. The recorded text also has every series of the
reference list that vLLM exports by default, so that list is checked against the real thing."""

from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.snapshot import KVCache, Speculation
from serve.prometheus import SERVER_DRAFTER, VLLMState, read_vllm
from serve.remote import RemoteEngine
from tests.serve.conftest import APIServer
from tests.serve.fake_openai import MODEL, FakeOpenAI, recorded
from tests.serve.vllm_metrics_reference import CACHE_CONFIG_INFO, REFERENCE, VLLM_VERSION

RECORDED_BUSY = "vllm_metrics_busy.txt"  # scraped while requests ran and queued
RECORDED_AFTER = "vllm_metrics_after.txt"  # scraped once they had ended


@dataclass(frozen=True)
class Recorded:
    """What the recorded text says, read off it by hand."""

    running: int
    waiting: int
    kv_percent: float
    blocks: int  # vllm:cache_config_info's num_gpu_blocks
    preemptions: int
    prefix_hits: int
    drafts: int
    drafted: int
    accepted: int


BUSY = Recorded(running=2, waiting=2, kv_percent=100 * 0.0055096418732781816, blocks=364, preemptions=0,
                prefix_hits=0, drafts=90, drafted=270, accepted=270)
AFTER = Recorded(running=0, waiting=0, kv_percent=0.0, blocks=364, preemptions=0, prefix_hits=0, drafts=248,
                 drafted=744, accepted=744)


def expected(r: Recorded) -> VLLMState:
    used = round(r.kv_percent / 100 * r.blocks)
    return VLLMState(r.running, r.waiting, KVCache(used, r.blocks - used, r.preemptions, r.prefix_hits),
                     Speculation(SERVER_DRAFTER, r.drafts, r.drafted, r.accepted, r.accepted + r.drafts))


@pytest.mark.parametrize("name,r", [(RECORDED_BUSY, BUSY), (RECORDED_AFTER, AFTER)])
def test_the_recorded_vllm_state_is_read(name, r):
    assert f"vLLM {VLLM_VERSION}" in recorded(name).splitlines()[0]
    assert read_vllm(recorded(name), MODEL) == expected(r)


def test_the_recorded_text_has_the_reference_series():
    families = {f.name: f.type for f in text_string_to_metric_families(recorded(RECORDED_AFTER))}
    for ref in (*REFERENCE, CACHE_CONFIG_INFO):
        assert families.get(ref.name) == ref.type, ref.name


def test_another_models_series_or_other_text_tell_nothing():
    assert read_vllm(recorded(RECORDED_BUSY), "another-model") == VLLMState()
    for text in ("", "<html>404</html>", "vllm:num_requests_running{model_name=", "# TYPE x gauge\nx 1 2 3 4\n"):
        assert read_vllm(text, MODEL) == VLLMState()
    # a series that is there, with one that is not: the panel it needs stays unknown
    text = "\n".join(line for line in recorded(RECORDED_BUSY).splitlines() if "cache_config_info" not in line)
    state = read_vllm(text, MODEL)
    assert state.kv is None and state.running == BUSY.running and state.speculation is not None


def test_a_remote_servers_state_comes_from_its_metrics():
    fake = FakeOpenAI(recorded(RECORDED_BUSY))
    with APIServer(fake.app) as server:
        remote = RemoteEngine(server.url)
        try:
            assert not remote.tradeoff
            state = remote.snapshot().state
            want = expected(BUSY)
            assert (state.running, state.waiting, state.kv, state.speculation) == \
                (want.running, want.waiting, want.kv, want.speculation)
            fake.metrics = None  # /metrics gone: what is known here, nothing more
            state = remote.snapshot().state
            assert (state.running, state.waiting, state.kv, state.speculation) == (0, 0, None, None)
        finally:
            remote.close()
