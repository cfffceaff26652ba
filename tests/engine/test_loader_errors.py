"""Bad model paths fail with a message that names the path and the expected format."""

import json
import shutil

import pytest

from engine.loader import ModelLoadError, load


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match=f"{missing}.*no such file.*expected"):
        load(str(missing))


def test_corrupt_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("TRADEOFF_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\xff" * 100)
    with pytest.raises(ModelLoadError, match=f"{bad}.*GGUF"):
        load(str(bad))
    assert not list((tmp_path / "cache" / "converted").glob("*/config.json"))  # nothing half-written is kept


def test_not_a_model_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"123")
    with pytest.raises(ModelLoadError, match=f"{f}.*not a .gguf"):
        load(str(f))


def test_unsupported_architecture(tmp_path, default_model):
    shutil.copy(default_model.folder / "config.json", tmp_path / "config.json")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*unsupported architecture 'gpt2'.*llama"):
        load(str(tmp_path))


def test_folder_without_weights(tmp_path, default_model):
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model.folder / f, tmp_path / f)
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*safetensors"):
        load(str(tmp_path))


def test_empty_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*config.json"):
        load(str(tmp_path))
