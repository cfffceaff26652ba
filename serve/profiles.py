"""Workload profiles: the applications the trade-off is decided for.

A profile is data: the prompt and output length distributions, the mean think time between one user's requests,
and an SLO at a percentile (`batch` has none: it maximises tokens/s and is judged by its cost per token). The
sweep, the planner and the load generator take one. Shipped: chat, code, rag, voice, batch, with the field's usual
targets; a user's own comes from a TOML or JSON file with the same fields (see `example_file`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from engine.stats import SLO
from serve.loadgen import Lengths, Workload


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    workload: Workload
    slo: SLO | None  # None: no latency target (throughput and cost decide)

    def fitted(self, context: int) -> tuple[Profile, str | None]:
        """This profile with its lengths scaled down so that the longest prompt plus the longest reply fit a context
        of `context` tokens, and a line saying so (None when nothing changed)."""
        p, o = self.workload.prompt_tokens, self.workload.output_tokens
        if p.hi + o.hi < context:
            return self, None
        f = (context - 1) / (p.hi + o.hi)

        def scaled(x: Lengths) -> Lengths:
            lo, hi = max(1, math.floor(x.lo * f)), max(1, math.floor(x.hi * f))
            return Lengths(min(hi, max(lo, round(x.mean * f))), x.stdev * f, lo, hi)

        w = replace(self.workload, prompt_tokens=scaled(p), output_tokens=scaled(o))
        return (replace(self, workload=w),
                f"profile {self.name}: lengths scaled by {f:.2f} to fit the model's {context}-token context")


def _profile(name: str, description: str, prompt: tuple[int, int, int], output: tuple[int, int, int], think_s: float,
             slo: SLO | None) -> Profile:
    """prompt and output as (lo, mean, hi); the stdev is a quarter of the range, so most draws fall inside it."""
    def lengths(lo: int, mean: int, hi: int) -> Lengths:
        return Lengths(mean, (hi - lo) / 4, lo, hi)

    return Profile(name, description, Workload(lengths(*prompt), lengths(*output), think_s), slo)


PROFILES: dict[str, Profile] = {p.name: p for p in (
    _profile("chat", "a chatbot: prompts of 100-1,000 tokens, replies of 100-300, read as they stream",
             (100, 400, 1000), (100, 200, 300), 5.0, SLO(ttft_s=0.5, tbt_s=0.08)),
    _profile("code", "code completion: 500-2,000 tokens of file context, replies of 1-16 tokens; TTFT decides",
             (500, 1000, 2000), (1, 8, 16), 2.0, SLO(ttft_s=0.2, tbt_s=0.08)),
    _profile("rag", "retrieval-augmented answers: 2,000-6,000 tokens of documents, replies of 100-300",
             (2000, 4000, 6000), (100, 200, 300), 10.0, SLO(ttft_s=2.0, tbt_s=0.08)),
    _profile("voice", "a voice agent: short turns over a growing conversation, replies of 20-60 tokens; the TTFT "
             "target is the LLM's share of a 500 ms turn", (200, 500, 1000), (20, 40, 60), 3.0,
             SLO(ttft_s=0.15, tbt_s=0.08)),
    _profile("batch", "offline documents with long outputs: no latency target, tokens/s and cost per token decide",
             (500, 1000, 2000), (200, 400, 800), 0.0, None),
)}

FIELDS = {  # a profile file's fields: name -> (type, meaning)
    "description": (str, "one line"),
    "prompt_tokens": (dict, "{mean, stdev, lo, hi}: prompt length in tokens"),
    "output_tokens": (dict, "{mean, stdev, lo, hi}: reply length in tokens"),
    "think_time_s": (float, "mean pause between one user's requests (exponential); 0 = none"),
    "slo": (dict, "{ttft_s, tbt_s, percentile, e2e_s}: omit for no latency target"),
}


class ProfileError(ValueError):
    """A profile that does not exist or a profile file that cannot be read; the message names the file and field."""


def example_file() -> str:
    """A profile file in TOML: the chat profile's numbers, each field explained."""
    return """# a tradeoff workload profile (TOML; JSON with the same keys works too)
description = "my chatbot"
think_time_s = 5.0                                          # mean pause between one user's requests
prompt_tokens = { mean = 400, stdev = 225, lo = 100, hi = 1000 }
output_tokens = { mean = 200, stdev = 50, lo = 100, hi = 300 }
slo = { ttft_s = 0.5, tbt_s = 0.08, percentile = 99 }       # e2e_s too, if you like; omit slo for none
"""


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name, or a TOML/JSON profile file by path."""
    if name_or_path in PROFILES:
        return PROFILES[name_or_path]
    path = Path(name_or_path)
    if path.suffix not in (".toml", ".json"):
        raise ProfileError(f"unknown profile {name_or_path!r}: give one of {', '.join(PROFILES)} or a .toml/.json file")
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"cannot read the profile file {path}: {e.strerror or e}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ProfileError(f"{path} is not valid {path.suffix[1:].upper()}: {e}") from None
    return profile_from(data, path.stem, str(path))


def profile_from(data: object, name: str, source: str) -> Profile:
    """A profile from a file's parsed contents; errors name `source` and the field."""
    def fail(field: str, why: str) -> ProfileError:
        return ProfileError(f"{source}: field {field!r} {why}")

    if not isinstance(data, dict):
        raise ProfileError(f"{source}: a profile is a table of fields ({', '.join(FIELDS)})")
    unknown = set(data) - set(FIELDS)
    if unknown:
        raise fail(sorted(unknown)[0], f"is not a profile field; the fields are {', '.join(FIELDS)}")
    for field in ("prompt_tokens", "output_tokens"):
        if field not in data:
            raise fail(field, f"is missing: {FIELDS[field][1]}")

    def number(value: object, field: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise fail(field, f"must be a number, got {value!r}")
        return float(value)

    def lengths(field: str) -> Lengths:
        table = data[field]
        if not isinstance(table, dict) or "mean" not in table or set(table) - {"mean", "stdev", "lo", "hi"}:
            raise fail(field, f"must be {FIELDS[field][1]} (mean required), got {table!r}")
        values = {k: number(v, f"{field}.{k}") for k, v in table.items()}
        mean = round(values["mean"])
        try:
            return Lengths(mean, values.get("stdev", 0.0), round(values.get("lo", 1)), round(values.get("hi", max(mean, 8192))))
        except ValueError as e:
            raise fail(field, str(e)) from None

    think = number(data.get("think_time_s", 0.0), "think_time_s")
    if think < 0:
        raise fail("think_time_s", f"must be >= 0, got {think}")
    slo = None
    if "slo" in data:
        table = data["slo"]
        keys = {"ttft_s", "tbt_s", "percentile", "e2e_s"}
        if not isinstance(table, dict) or set(table) - keys or not table:
            raise fail("slo", f"must be {FIELDS['slo'][1]}, got {table!r}")
        try:
            slo = SLO(**{k: number(v, f"slo.{k}") for k, v in table.items()})
        except ValueError as e:
            raise fail("slo", str(e)) from None
    description = data.get("description", f"from {source}")
    if not isinstance(description, str):
        raise fail("description", f"must be a string, got {description!r}")
    return Profile(name, description, Workload(lengths("prompt_tokens"), lengths("output_tokens"), think), slo)
