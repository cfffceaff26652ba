"""GGUF -> a Hugging Face-style folder (config.json, model.safetensors, tokenizer files), done once and cached.

Dequantising in numpy takes ~20 s for the default model, so the result is written to the user cache
and later starts load the folder directly. Q4_0/Q4_1/Q8_0/F16/F32 are dequantised in torch (fast);
other quant types fall back to `gguf.quants.dequantize`. llama.cpp permutes the Q/K rows of `llama`
models for its interleaved RoPE; we undo that so the cached folder is in the HF rotate-half layout.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from engine.tokenizer import tokenizer_from_gguf

CONVERTER_VERSION = 2  # bump when the output of the conversion changes, to invalidate old caches

GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_BLOCK_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in GGUF_TO_HF:
        return GGUF_TO_HF[gguf_name]
    if gguf_name.startswith("blk."):
        _, layer, rest = gguf_name.split(".", 2)
        if rest in GGUF_BLOCK_TO_HF:
            return f"model.layers.{layer}.{GGUF_BLOCK_TO_HF[rest]}"
    return None


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """One GGUF tensor -> float32 torch tensor of `shape` (rows, cols)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize as gguf_dequantize

    if qtype in (Q.F32, Q.F16):
        return torch.from_numpy(np.array(raw)).float().reshape(shape)
    block_bytes = {Q.Q4_0: 18, Q.Q4_1: 20, Q.Q8_0: 34}.get(qtype)
    if block_bytes is None:
        return torch.from_numpy(np.array(gguf_dequantize(raw, qtype), dtype=np.float32)).reshape(shape)
    blocks = torch.from_numpy(np.array(raw, dtype=np.uint8)).reshape(-1, block_bytes)
    d = blocks[:, 0:2].contiguous().view(torch.float16).float()
    if qtype == Q.Q8_0:
        return (blocks[:, 2:].contiguous().view(torch.int8).float() * d).reshape(shape)
    qs = blocks[:, block_bytes - 16 :]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()  # low nibbles are elements 0-15, high 16-31
    if qtype == Q.Q4_0:
        return ((q - 8) * d).reshape(shape)
    m = blocks[:, 2:4].contiguous().view(torch.float16).float()
    return (q * d + m).reshape(shape)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert_hf_to_gguf `permute` (interleaved RoPE rows -> rotate-half rows)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def converted_folder(gguf_path: Path, cache: Path) -> Path:
    st = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERTER_VERSION}"
    return cache / "converted" / f"{gguf_path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def convert(gguf_path: Path, out: Path) -> None:
    """Write the HF-style folder for `gguf_path` into `out` (atomically: via a temporary sibling)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as e:
        raise ValueError(f"not a readable GGUF file ({type(e).__name__}: {e})") from e

    def field(key: str, default: object = None) -> object:
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unsupported GGUF architecture {arch!r} (supported: llama, mistral via llama, qwen2)")
    if field("tokenizer.ggml.model") != "gpt2":
        raise ValueError(
            f"unsupported GGUF tokenizer {field('tokenizer.ggml.model')!r}: only byte-level BPE ('gpt2') is read "
            "from GGUF; for SentencePiece models use the Hugging Face folder"
        )
    n_heads = int(field(f"{arch}.attention.head_count"))
    n_kv = int(field(f"{arch}.attention.head_count_kv", n_heads))
    dim = int(field(f"{arch}.embedding_length"))
    tokens = field("tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    config = {
        "model_type": arch,
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": len(tokens),
        "hidden_size": dim,
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": int(field(f"{arch}.rope.dimension_count", dim // n_heads)),
        "intermediate_size": int(field(f"{arch}.feed_forward_length")),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(field(f"{arch}.context_length")),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    weights: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"dequantising {gguf_path.name}", unit="tensor"):
        name = hf_name(t.name)
        if name is None:
            continue  # e.g. rope_freqs: recomputed from the config
        w = dequantize(t.data, t.tensor_type, tuple(reversed([int(x) for x in t.shape])))
        if arch == "llama" and ".q_proj." in name:
            w = unpermute(w, n_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = unpermute(w, n_kv)
        weights[name] = w.contiguous()

    ids = {k: field(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos")}
    tok = tokenizer_from_gguf(tokens, field("tokenizer.ggml.merges"), field("tokenizer.ggml.token_type"),
                              field("tokenizer.ggml.pre", "default"))
    tok_config = {
        "bos_token": tokens[ids["bos"]] if ids["bos"] is not None else None,
        "eos_token": tokens[ids["eos"]] if ids["eos"] is not None else None,
        "chat_template": field("tokenizer.chat_template"),
    }
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    (tmp / "SOURCE").write_text(str(gguf_path.resolve()) + "\n")
    tmp.replace(out)
