"""Tokenizer, chat template and streaming detokenizer.

Text <-> ids through the `tokenizers` library, chat prompts through the model's own Jinja template
(rendered in a sandbox, as Hugging Face does), and `IncrementalDetokenizer`, which turns a growing id
list into text deltas without ever splitting a multi-byte UTF-8 character.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

# End-of-turn markers of common chat templates; any of them present in the vocabulary stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>", "<end_of_turn>", "</s>")

# GGUF pre-tokenizer names -> split regex (llama.cpp's llama-vocab.cpp). `smollm` splits digits singly.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def gguf_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if pre in ("default", "gpt-2", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    split = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r} (supported: smollm, gpt2, llama-bpe, qwen2)")
    from tokenizers import Regex

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def tokenizer_from_gguf(tokens: list[str], merges: list[str], token_types: list[int], pre: str) -> HFTokenizer:
    """A byte-level BPE built from GGUF vocabulary metadata (the recipe that matches llama.cpp and HF)."""
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = HFTokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = gguf_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken

    # GGUF token types: 3 = control (special), 4 = user-defined (added, not special).
    added = [AddedToken(t, special=(ty == 3), normalized=False) for t, ty in zip(tokens, token_types) if ty in (3, 4)]
    tok.add_tokens(added)
    return tok


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None, bos_token: str | None, eos_token: str | None,
                 extra_stop_ids: tuple[int, ...] = ()):
        self.tok = tok
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        self._template = env.from_string(chat_template) if chat_template else None
        stops = {tok.token_to_id(t) for t in (eos_token, *END_OF_TURN_TOKENS) if t}
        self.stop_ids = frozenset(i for i in stops | set(extra_stop_ids) if i is not None)

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """A Hugging Face folder: tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        tok = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        if (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        gen_path = folder / "generation_config.json"
        gen_eos = json.loads(gen_path.read_text()).get("eos_token_id") if gen_path.exists() else None
        extra = tuple(gen_eos) if isinstance(gen_eos, list) else ((gen_eos,) if isinstance(gen_eos, int) else ())

        def token_str(v: object) -> str | None:
            return v.get("content") if isinstance(v, dict) else v  # type: ignore[return-value]

        return cls(tok, template, token_str(cfg.get("bos_token")), token_str(cfg.get("eos_token")), extra)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token strings in it (from a rendered template) become their ids."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(self.render_chat(messages))


class IncrementalDetokenizer:
    """Text deltas for a growing token list.

    Decodes a short window of trailing ids and emits only what is new once it no longer ends in an
    incomplete UTF-8 sequence (U+FFFD); byte-level BPE can split one character across tokens.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:]) if prompt_ids else []  # context for leading-space merges
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (a dangling partial character)."""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]
