"""Per-turn latency: when each stage finished, and the `tradeoff.metrics` event that reports it.

The stages overlap (ASR starts during the end-of-turn wait, and the reply may be drafted before the
decision), so the breakdown charges each stage only the time it added to the critical path: the gap
between its finish and the latest earlier finish. The parts therefore sum exactly to the server's
end-to-end time: the real (backdated) end of speech to the first audio delta sent. The client adds
transport on top and measures its own E2E.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engine.metrics import RequestMetrics, percentile

# The voice SLO: speech end -> first reply audio within this, the bar a voice agent is held to. A turn that meets it
# counts toward voice goodput (the share of turns that meet it; a turn never answered does not).
VOICE_SLO_MS = 500.0

# (stage, timestamp attribute) in pipeline order
STAGES = (
    ("endpointing", "vad_decision"), ("asr", "asr_final"), ("queue", "llm_scheduled"), ("llm_ttft", "llm_first_token"),
    ("first_clause", "first_clause"), ("tts", "tts_first_chunk"), ("send", "first_audio_sent"),
)


@dataclass
class TurnTimes:
    """time.monotonic() seconds; None where a stage did not happen (a typed message has no speech)."""

    speech_end: float | None = None  # backdated to the audio chunk that held the last speech
    vad_decision: float | None = None
    asr_final: float | None = None
    llm_scheduled: float | None = None  # the engine took the reply's request up (it waited behind others till then)
    llm_first_token: float | None = None
    first_clause: float | None = None
    tts_first_chunk: float | None = None
    first_audio_sent: float | None = None
    asr_start: float | None = None  # when the final transcript's decode began (usually the first silent chunk)
    asr_compute_s: float | None = None  # the recognizer's own time for the final transcript
    asr_audio_s: float | None = None
    drafted: bool = False  # the reply was drafted before the end-of-turn decision
    turn_reason: str | None = None  # what ended the turn: silence | semantic | too_long | commit
    turn_probability: float | None = None  # semantic_vad: Smart Turn's P(complete) at the pause that ended the turn
    turn_model_s: float | None = None  # ... and how long that judgment took
    text_probability: float | None = None  # semantic_vad: the LLM's P(end of turn) after that pause's transcript
    text_model_s: float | None = None  # ... and how long that took, from the transcript to the answer

    def stamp(self, **times: float | bool | None) -> None:
        """The one way stages are recorded: each is set once, the first time it happens (later calls keep it)."""
        for name, value in times.items():
            if not hasattr(self, name):
                raise AttributeError(f"TurnTimes has no stage {name!r}")
            if getattr(self, name) in (None, False):
                setattr(self, name, value)

    def speech_only(self) -> TurnTimes:
        """The same turn's speech stages, none of its reply's (a reply that starts over is timed again)."""
        return replace(self, llm_scheduled=None, llm_first_token=None, first_clause=None, tts_first_chunk=None,
                       first_audio_sent=None, drafted=False)

    def breakdown_ms(self) -> dict[str, float] | None:
        """Critical-path milliseconds per stage; None unless every stage from speech end to audio happened."""
        if self.speech_end is None or any(getattr(self, attr) is None for _, attr in STAGES):
            return None
        parts, latest = {}, self.speech_end
        for name, attr in STAGES:
            t = getattr(self, attr)
            parts[name] = max(0.0, t - latest) * 1000
            latest = max(latest, t)
        return parts

    def event_payload(self, engine_metrics: RequestMetrics | None) -> dict:
        parts = self.breakdown_ms()
        itls = engine_metrics.itls if engine_metrics else []
        return {
            "timestamps": {"speech_end": self.speech_end, "asr_start": self.asr_start,
                           **{attr: getattr(self, attr) for _, attr in STAGES}},
            "drafted": self.drafted,
            "turn": {"reason": self.turn_reason, "probability": self.turn_probability,
                     "model_ms": _ms(self.turn_model_s), "text_probability": self.text_probability,
                     "text_model_ms": _ms(self.text_model_s)},
            "breakdown_ms": parts,
            "e2e_ms": sum(parts.values()) if parts else None,
            "asr": {"compute_ms": _ms(self.asr_compute_s), "audio_ms": _ms(self.asr_audio_s)},
            "llm": None if engine_metrics is None else {
                "ttft_ms": _ms(engine_metrics.ttft), "queue_ms": _ms(engine_metrics.queue_time),
                "prompt_tokens": engine_metrics.prompt_tokens, "output_tokens": engine_metrics.output_tokens,
                "finish_reason": engine_metrics.finish_reason,
            },
            "tbt_ms": {"n": len(itls), "mean": _ms(sum(itls) / len(itls)) if itls else None,
                       "p50": _ms(percentile(itls, 50)), "p90": _ms(percentile(itls, 90)),
                       "p99": _ms(percentile(itls, 99)), "max": _ms(max(itls)) if itls else None},
        }


def goodput(e2e_ms: list[float | None], slo_ms: float = VOICE_SLO_MS) -> float | None:
    """The share of turns whose end-to-end time meets `slo_ms`; a None (a turn never answered) counts as a miss."""
    return sum(ms is not None and ms <= slo_ms for ms in e2e_ms) / len(e2e_ms) if e2e_ms else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000
