"""The trained draft model of the default target, for speculative decoding.

The default model has no smaller sibling, so `tradeoff distill` (engine/distill.py) trains one: an
`engine.model.Transformer` with the target's shape but only a layer or two of its own and its own final
norm. It reads the target's embedding tensor itself (the same storage, no copy). Its output head is
the target's, cut down to the N tokens the target emits most often (`Draft.vocab_ids`): the full
49152-row head would cost as much as several target layers per drafted token. `Draft.logits` still
returns full-vocabulary logits, -inf outside the subset, so callers treat the draft like any model;
a token outside the subset is simply never drafted, which speculation tolerates (it only costs acceptance).

File format: safetensors with the draft's own weights (fp16) and `vocab_ids`, plus one metadata entry
"draft" holding JSON: the config, the target layers it started from, and how it was trained.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from engine.loader import ModelLoadError
from engine.model import ModelConfig, Transformer

DEFAULT_DRAFT_PATH = Path(__file__).parent / "drafts" / "smollm2-135m-draft.safetensors"
# Config fields that may differ between a draft and its target; every other one must match.
OWN_FIELDS = ("n_layers", "max_seq_len")


class Draft(Transformer):
    """A shallow Transformer over the target's embedding; `vocab_ids` [N] (int64) are the tokens its head covers."""

    def __init__(self, target: Transformer, n_layers: int, vocab_ids: Tensor):
        super().__init__(replace(target.cfg, n_layers=n_layers), target.weight_dtype, target.device, act_dtype=target.dtype)
        self.embed = target.embed  # the target's own tensor: shared, not copied
        self.vocab_ids = vocab_ids.to(device=target.device, dtype=torch.long)
        # The head's rows are gathered once into one contiguous [N, dim] matrix, the only copy made.
        self.lm_head = nn.Parameter(target.lm_head.detach()[self.vocab_ids], requires_grad=False)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [..., dim] -> fp32 logits [..., vocab_size], -inf for tokens outside `vocab_ids`."""
        sub = super().logits(hidden)  # [..., N]: the subset head (or its quantized copy, `head_q`)
        full = sub.new_full((*sub.shape[:-1], self.cfg.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.vocab_ids, sub)


def init_draft(target: Transformer, layers: tuple[int, ...], vocab_ids: Tensor) -> Draft:
    """A draft whose layers start as copies of the target's `layers` and whose final norm is the target's."""
    if not layers or any(not 0 <= i < target.cfg.n_layers for i in layers):
        raise ValueError(f"source layers {layers} must be a non-empty subset of 0..{target.cfg.n_layers - 1}")
    draft = Draft(target, len(layers), vocab_ids)
    with torch.no_grad():
        for own, src in zip(draft.layers, layers):
            own.load_state_dict(target.layers[src].state_dict())
        draft.norm.copy_(target.norm)
    return draft


def own_weights(draft: Draft) -> dict[str, Tensor]:
    """The draft's trainable tensors (its layers and final norm); the embedding and head belong to the target."""
    return {f"layers.{name}": t for name, t in draft.layers.state_dict().items()} | {"norm": draft.norm}


def save_draft(draft: Draft, path: str | Path, source_layers: tuple[int, ...], training: dict) -> Path:
    """Write the draft's own weights (fp16), its vocabulary subset and a JSON metadata entry."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu", torch.float16).contiguous() for name, t in own_weights(draft).items()}
    tensors["vocab_ids"] = draft.vocab_ids.to("cpu", torch.int32)
    meta = {"config": asdict(draft.cfg), "source_layers": list(source_layers), "vocab_size_subset": len(draft.vocab_ids),
            "training": training}
    save_file(tensors, str(path), metadata={"draft": json.dumps(meta)})
    return path


def read_metadata(path: str | Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["draft"])


def load_draft(target: Transformer, path: str | Path = DEFAULT_DRAFT_PATH) -> Draft:
    """The draft at `path`, on the target's device and dtype; raises ModelLoadError if it was made for another shape."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such draft file; expected a draft written by `tradeoff distill`")
    try:
        meta = read_metadata(path)
        with safe_open(str(path), "pt") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable draft file ({type(e).__name__}: {e})") from e
    wrong = [f"{f.name} {getattr(cfg, f.name)} != {getattr(target.cfg, f.name)}"
             for f in fields(ModelConfig) if f.name not in OWN_FIELDS and getattr(cfg, f.name) != getattr(target.cfg, f.name)]
    if wrong:
        raise ModelLoadError(f"{path}: this draft was trained for another target model ({'; '.join(wrong)})")
    draft = Draft(target, cfg.n_layers, tensors.pop("vocab_ids"))
    own = own_weights(draft)
    if set(tensors) != set(own):
        raise ModelLoadError(f"{path}: draft tensors {sorted(tensors)} do not match the expected {sorted(own)}")
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != own[name].shape:
                raise ModelLoadError(f"{path}: tensor {name} has shape {tuple(t.shape)}, expected {tuple(own[name].shape)}")
            own[name].copy_(t)
    return draft
