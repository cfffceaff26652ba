"""Our logits equal Hugging Face transformers' on the same weights (fp32, 1e-4 relative)."""

import shutil

import pytest
import torch
import transformers

from engine.kv_cache import StaticKVCache
from engine.loader import load
from engine.model import Transformer


def our_logits(loaded, ids: list[int]) -> torch.Tensor:
    model = Transformer(loaded.config)
    model.load_canonical(loaded.weights)
    cache = StaticKVCache(loaded.config, len(ids) + 1, torch.float32)
    return model.logits(model(torch.tensor(ids), cache.begin(len(ids)), cache))


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"max |ours - HF| = {err:.3g}, allowed {1e-4 * scale:.3g}"


TINY = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def tiny_configs():
    return {
        "llama": transformers.LlamaConfig(**TINY, rope_theta=10000.0, tie_word_embeddings=False),
        "llama-tied-gqa1-llama3rope": transformers.LlamaConfig(
            **{**TINY, "num_key_value_heads": 4}, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}),
        "qwen2": transformers.Qwen2Config(**TINY, rope_theta=1000000.0, tie_word_embeddings=True),
        "mistral": transformers.MistralConfig(**TINY, sliding_window=None, head_dim=16),
    }


@pytest.mark.parametrize("name", list(tiny_configs()))
def test_tiny_random_models_match_hf(name, tmp_path, default_model):
    torch.manual_seed(0)
    cfg = tiny_configs()[name]
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random norms too, so a norm applied to the wrong tensor shows
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(tmp_path, max_shard_size="1MB")  # several shards: the loader must merge them
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model.folder / f, tmp_path / f)

    loaded = load(str(tmp_path))
    assert loaded.config.arch == cfg.model_type
    ids = torch.randint(0, cfg.vocab_size, (40,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert_logits_close(our_logits(loaded, ids), ref)


def test_default_gguf_matches_hf(default_model, default_gguf):
    hf = transformers.AutoModelForCausalLM.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name,
                                                           dtype=torch.float32).eval()
    ids = default_model.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    assert_logits_close(our_logits(default_model, ids), ref)


def test_incremental_decode_matches_full_forward(default_model):
    """Prefill + one-token steps through the KV cache give the logits of one full forward."""
    model = Transformer(default_model.config)
    model.load_canonical(default_model.weights)
    ids = default_model.tokenizer.encode("The quick brown fox jumps over the lazy dog because")
    full_cache = StaticKVCache(default_model.config, 64, torch.float32)
    full = model.logits(model(torch.tensor(ids), full_cache.begin(len(ids)), full_cache))
    cache = StaticKVCache(default_model.config, 64, torch.float32)
    steps = [model.logits(model(torch.tensor(ids[:5]), cache.begin(5), cache))]
    for tok in ids[5:]:
        steps.append(model.logits(model(torch.tensor([tok]), cache.begin(1), cache)))
    assert_logits_close(torch.cat(steps), full)
