"""Model loading: a registry name, a `.gguf` file or a Hugging Face folder -> (config, weights, tokenizer).

A GGUF file is converted once into a cached HF-style folder (see gguf_convert), so every format ends up
on the one folder path below. Every failure names the path and says what was expected.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine import registry
from engine.gguf_convert import convert, converted_folder
from engine.model import SUPPORTED_ARCHITECTURES, ModelConfig
from engine.tokenizer import Tokenizer

HF_FOLDER_EXPECTED = "a Hugging Face folder with config.json, *.safetensors and tokenizer.json"
GGUF_EXPECTED = "a GGUF v2/v3 file of a llama, mistral or qwen2 model with a byte-level BPE tokenizer"
EXPECTED = f"a registry name ({', '.join(registry.REGISTRY)}), a .gguf file, or {HF_FOLDER_EXPECTED}"


class ModelLoadError(Exception):
    """The model at a path could not be loaded; the message names the path and what was expected."""


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    folder: Path


def load(spec: str) -> LoadedModel:
    path, folder = model_folder(spec)
    try:
        config = read_config(folder)
        weights = read_weights(folder)
        tokenizer = Tokenizer.from_folder(folder)
    except ModelLoadError:
        raise
    except Exception as e:  # corrupt JSON/safetensors/tokenizer: report the path, keep the cause
        raise ModelLoadError(f"{path}: could not read model ({type(e).__name__}: {e}); expected {EXPECTED}") from e
    return LoadedModel(spec if spec in registry.REGISTRY else path.name, config, weights, tokenizer, folder)


def load_tokenizer(spec: str) -> Tokenizer:
    """Only the tokenizer of a model (what a remote backend's load generator sizes its prompts with)."""
    path, folder = model_folder(spec)
    try:
        return Tokenizer.from_folder(folder)
    except Exception as e:
        raise ModelLoadError(f"{path}: could not read the tokenizer ({type(e).__name__}: {e}); expected {EXPECTED}") from e


def model_folder(spec: str) -> tuple[Path, Path]:
    """(the path `spec` names, the HF-style folder holding it), converting a GGUF file on first use."""
    path = registry.resolve(spec)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder; expected {EXPECTED}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path}: not a .gguf file; expected {EXPECTED}")
        return path, gguf_folder(path)
    return path, path


def gguf_folder(path: Path) -> Path:
    folder = converted_folder(path, registry.cache_dir())
    if not (folder / "config.json").exists():
        print(f"Converting {path.name} (once; cached in {folder.parent}) ...", file=sys.stderr)
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            convert(path, folder)
        except Exception as e:
            raise ModelLoadError(f"{path}: {e}; expected {GGUF_EXPECTED}") from e
    return folder


def read_config(folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise ModelLoadError(f"{folder}: no config.json; expected {HF_FOLDER_EXPECTED}")
    c = json.loads(cfg_path.read_text())
    arch = c.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{folder}: unsupported architecture {arch!r} (model_type in config.json); "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM is llama)"
        )
    if c.get("mlp_bias") or (arch != "qwen2" and c.get("attention_bias")):
        raise ModelLoadError(f"{folder}: attention_bias/mlp_bias on {arch} is not supported")
    rope_params = c.get("rope_parameters") or {}
    rope_theta = c.get("rope_theta") or rope_params.get("rope_theta") or 10000.0
    scaling = c.get("rope_scaling") or (rope_params if rope_params.get("rope_type", "default") != "default" else None)
    rope_scaling = None
    if scaling:
        kind = scaling.get("rope_type") or scaling.get("type")
        if kind != "llama3":
            raise ModelLoadError(f"{folder}: unsupported rope_scaling type {kind!r} (supported: llama3)")
        rope_scaling = (float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"]),
                        int(scaling["original_max_position_embeddings"]))
    n_heads = c["num_attention_heads"]
    max_seq = c.get("max_position_embeddings", 4096)
    if c.get("sliding_window") and c.get("use_sliding_window", True):
        max_seq = min(max_seq, c["sliding_window"])  # within the window, full attention is exact
    return ModelConfig(
        arch=arch,
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
        ffn_dim=c["intermediate_size"],
        rope_theta=float(rope_theta),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        max_seq_len=max_seq,
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2",
        rope_scaling=rope_scaling,
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors files; expected {HF_FOLDER_EXPECTED}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:  # sharded checkpoints: every shard holds a disjoint set of names
        weights.update(load_file(str(f)))
    return weights
