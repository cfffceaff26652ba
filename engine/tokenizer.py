"""Tokenizer, chat template and streaming detokenizer.

Text <-> ids through the `tokenizers` library, chat prompts through the model's own Jinja template
(rendered in a sandbox, as Hugging Face does), and `IncrementalDetokenizer`, which turns a growing id
list into text deltas without ever splitting a multi-byte UTF-8 character.

In a chat prompt only the template's own markers are control tokens: message content is text, so a user who
writes `<|im_end|>` gets the tokens of those characters, not an end of turn.

Long text is encoded in pieces of about PIECE_CHARS characters, cut where every supported pre-tokenizer splits anyway
(so the ids are those of one call), and a caller that only needs to know whether text fits (`limit`) gets an answer
once the count passes it. One call on megabytes of text can hold the GIL for seconds, and would stall the server's
event loop even from a worker thread.
"""

from __future__ import annotations

import json
import re
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


PIECE_CHARS = 16_384
_CUT = re.compile(r"(?<=\S) (?=\S)")  # a single space between two other characters


def _encode(tok: HFTokenizer, text: str, limit: int | None) -> list[int]:
    """`tok`'s ids of `text`, encoded piecewise when it is long; with `limit`, stops once more than `limit` are known."""
    ids: list[int] = []
    start = 0
    while start < len(text) and (limit is None or len(ids) <= limit):
        end = _cut(text, start + PIECE_CHARS) if len(text) - start > PIECE_CHARS else len(text)
        ids += tok.encode(text[start:end], add_special_tokens=False).ids
        start = end
    return ids


def _cut(text: str, end: int) -> int:
    """Where a piece ending near `end` ends: before the last single space in the second half of the piece (a byte-level
    pre-tokenizer always splits there: the space begins the next word); at `end` itself in text with no such space."""
    spaces = list(_CUT.finditer(text, end - PIECE_CHARS // 2, end))
    return spaces[-1].start() if spaces else end


def _unused_private_char(texts: list[str]) -> str:
    """A private-use character that none of `texts` holds (it marks where content goes in a rendered template)."""
    for code in range(0xE000, 0xF900):
        if not any(chr(code) in t for t in texts):
            return chr(code)
    raise ValueError("message content uses every private-use character; no room to mark it")


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    def __init__(self, tok: HFTokenizer, chat_template: str | None, bos_token: str | None, eos_token: str | None,
                 extra_stop_ids: tuple[int, ...] = ()):
        self.tok = tok
        # the same tokenizer with special-token parsing off, for text that must stay text (message content); a
        # second object because the flag is the tokenizer's state and encodes run on many threads
        self.text_tok = HFTokenizer.from_str(tok.to_str())
        self.text_tok.encode_special_tokens = True
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

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Ids of `text`; special-token strings in it (from a rendered template) become their ids. With `limit`, only
        the first ids past it are certain to be there: enough to tell that the text does not fit."""
        return _encode(self.tok, text, limit)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "",
        )

    def encode_text(self, text: str, limit: int | None = None) -> list[int]:
        """Ids of `text` as plain text: special-token strings in it are spelled out, not turned into their ids.
        `limit` as for `encode`."""
        return _encode(self.text_tok, text, limit)

    def encode_chat(self, messages: list[dict], limit: int | None = None, open_last: bool = False) -> list[int]:
        """The rendered template's ids, its markers as control tokens and every message's content as plain text.
        `open_last`: the last message left open, the ids ending with its content (no end marker, no generation prompt),
        so the next token's probabilities say whether the speaker would end their turn there.

        The template renders with a placeholder for each content, so what it writes around the content (and what it
        does with it: repeat it, drop it) is known exactly; each piece between placeholders is encoded on its own. (A
        template that edits content, such as trimming it, edits the placeholder: the content goes in as sent.)
        `limit` as for `encode`."""
        contents = [m.get("content") for m in messages]
        if open_last and not isinstance(contents[-1], str):
            raise ValueError("open_last needs a last message with text content")
        mark = _unused_private_char([c for c in contents if isinstance(c, str)])
        placeholders = [{**m, "content": f"{mark}{i}{mark}"} if isinstance(c, str) else m
                        for i, (m, c) in enumerate(zip(messages, contents))]
        pieces = re.split(f"{mark}(\\d+){mark}", self.render_chat(placeholders, add_generation_prompt=not open_last))
        if open_last:  # up to the last message's content, where the template would write its end marker
            pieces = pieces[:max(j for j in range(1, len(pieces), 2) if int(pieces[j]) == len(messages) - 1) + 1]
        ids: list[int] = []
        for j, piece in enumerate(pieces):  # template text, a content's index, template text, ...
            if limit is not None and len(ids) > limit:
                break
            left = None if limit is None else limit - len(ids)
            if j % 2:
                ids += self.encode_text(contents[int(piece)], left)
            elif piece:
                ids += self.encode(piece, left)
        return ids


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
