"""Split streamed LLM text into clauses that TTS can speak while the rest is still being generated.

Text is cut at sentence ends, at newlines, and at clause punctuation (, ; :) once a clause has a few
words. The first clause of a reply is also cut after `first_words` words: the listener waits for it,
and it is the only clause that does (the model writes the next one faster than speech plays it).
Markdown marks, which TTS would read out or stumble on, are dropped.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*\s|\n")
_CLAUSE_END = re.compile(r"[,;:]\s")
_MARKDOWN = re.compile(r"[*_`#>|~]+|^\s*(?:[-+]|\d+\.)\s+", re.MULTILINE)


def speakable(text: str) -> str:
    return " ".join(_MARKDOWN.sub(" ", text).split())


class ClauseSplitter:
    def __init__(self, first_words: int = 4, min_clause_words: int = 3):
        self.first_words = first_words
        self.min_clause_words = min_clause_words
        self.buffer = ""
        self.emitted = 0  # clauses returned so far

    def feed(self, text: str) -> list[tuple[str, bool]]:
        """Add generated text; return finished clauses as (text, ends_sentence)."""
        self.buffer += text
        out = []
        while cut := self._next_cut():
            end, ends_sentence = cut
            clause = speakable(self.buffer[:end])
            self.buffer = self.buffer[end:]
            if clause:
                out.append((clause, ends_sentence))
                self.emitted += 1
        return out

    def flush(self) -> tuple[str, bool] | None:
        """The text left when generation ends (it ends the reply, so it gets the closing pause)."""
        clause, self.buffer = speakable(self.buffer), ""
        if not clause:
            return None
        self.emitted += 1
        return clause, True

    def _next_cut(self) -> tuple[int, bool] | None:
        if m := _SENTENCE_END.search(self.buffer):
            return m.end(), True
        for m in _CLAUSE_END.finditer(self.buffer):
            if len(self.buffer[: m.end()].split()) >= self.min_clause_words:
                return m.end(), False
        if self.emitted == 0 and self.first_words:
            # A word is complete once whitespace follows it; cut after the first `first_words` of them.
            words = list(re.finditer(r"\S+\s", self.buffer))
            if len(words) >= self.first_words and speakable(self.buffer[: words[self.first_words - 1].end()]):
                return words[self.first_words - 1].end(), False
        return None
