"""Workload profiles: the shipped ones carry the field's usual targets, a user's TOML or JSON file reads the same,
and a bad file is an error that names the file and the field."""

import json

import pytest

from engine.metrics import RequestMetrics
from engine.stats import SLO
from serve.profiles import PROFILES, ProfileError, example_file, load_profile


def test_the_shipped_profiles_and_their_slos():
    targets = {name: (p.slo.ttft_s, p.slo.tbt_s, p.slo.percentile) if p.slo else None for name, p in PROFILES.items()}
    assert targets == {"chat": (0.5, 0.08, 99), "code": (0.2, 0.08, 99), "rag": (2.0, 0.08, 99),
                       "voice": (0.15, 0.08, 99), "batch": None}
    ranges = {name: ((p.workload.prompt_tokens.lo, p.workload.prompt_tokens.hi),
                     (p.workload.output_tokens.lo, p.workload.output_tokens.hi)) for name, p in PROFILES.items()}
    assert ranges["chat"] == ((100, 1000), (100, 300)) and ranges["code"] == ((500, 2000), (1, 16))
    assert ranges["rag"] == ((2000, 6000), (100, 300)) and ranges["voice"][1] == (20, 60)


def test_a_toml_file_and_a_json_file_give_the_same_profile(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text(example_file())
    from_toml = load_profile(str(toml))
    as_json = {"description": "my chatbot", "think_time_s": 5.0,
               "prompt_tokens": {"mean": 400, "stdev": 225, "lo": 100, "hi": 1000},
               "output_tokens": {"mean": 200, "stdev": 50, "lo": 100, "hi": 300},
               "slo": {"ttft_s": 0.5, "tbt_s": 0.08, "percentile": 99}}
    (tmp_path / "mine.json").write_text(json.dumps(as_json))
    from_json = load_profile(str(tmp_path / "mine.json"))
    assert from_toml == from_json
    assert from_toml.workload == PROFILES["chat"].workload and from_toml.slo == PROFILES["chat"].slo
    assert from_toml.name == "mine"


@pytest.mark.parametrize("body, field", [
    ('prompt_tokens = {mean = 10}', "output_tokens"),  # missing
    ('prompt_tokens = {mean = 10}\noutput_tokens = {mean = 5}\ncolour = "red"', "colour"),  # unknown
    ('prompt_tokens = {mean = "ten"}\noutput_tokens = {mean = 5}', "prompt_tokens.mean"),
    ('prompt_tokens = {mean = 10, lo = 20}\noutput_tokens = {mean = 5}', "prompt_tokens"),  # lo > mean
    ('prompt_tokens = {mean = 10}\noutput_tokens = {mean = 5}\nslo = {ttft_s = 0.5, percentile = 100}', "slo"),
    ('prompt_tokens = {mean = 10}\noutput_tokens = {mean = 5}\nslo = {ttft_s = -1}', "slo"),
    ('prompt_tokens = {mean = 10}\noutput_tokens = {mean = 5}\nslo = {ttft = 1}', "slo"),
    ('prompt_tokens = {mean = 10}\noutput_tokens = {mean = 5}\nthink_time_s = -2', "think_time_s"),
])
def test_a_bad_profile_file_names_the_file_and_the_field(tmp_path, body, field):
    path = tmp_path / "bad.toml"
    path.write_text(body)
    with pytest.raises(ProfileError) as e:
        load_profile(str(path))
    assert str(path) in str(e.value) and repr(field) in str(e.value)


def test_unreadable_and_unknown_profiles(tmp_path):
    with pytest.raises(ProfileError, match="cannot read the profile file .*nope.toml"):
        load_profile(str(tmp_path / "nope.toml"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ProfileError, match="broken.json is not valid JSON"):
        load_profile(str(tmp_path / "broken.json"))
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ProfileError, match="a profile is a table of fields"):
        load_profile(str(tmp_path / "list.json"))
    with pytest.raises(ProfileError, match="unknown profile 'chatty': give one of chat, code, rag, voice, batch"):
        load_profile("chatty")


def test_lengths_are_scaled_to_fit_a_small_context():
    rag = PROFILES["rag"]
    fitted, note = rag.fitted(2048)
    p, o = fitted.workload.prompt_tokens, fitted.workload.output_tokens
    assert p.hi + o.hi < 2048 and p.lo <= p.mean <= p.hi and o.lo <= o.mean <= o.hi
    assert p.mean / o.mean == pytest.approx(rag.workload.prompt_tokens.mean / rag.workload.output_tokens.mean, rel=0.02)
    assert note is not None and "2048-token context" in note
    assert rag.fitted(8192) == (rag, None)


def test_an_slo_judges_e2e_only_when_it_has_one():
    m = RequestMetrics(arrival=0.0, emissions=[(0.1, 1, "latency"), (0.15, 1, "latency"), (2.0, 1, "latency")])
    assert not SLO(ttft_s=0.5, tbt_s=1.0, e2e_s=1.5).met_by(m)  # E2E 2 s
    assert SLO(ttft_s=0.5, tbt_s=1.0).met_by(m) and SLO(ttft_s=0.5, tbt_s=1.0, e2e_s=2.5).met_by(m)
    assert not SLO(ttft_s=0.05, tbt_s=1.0).met_by(m)
