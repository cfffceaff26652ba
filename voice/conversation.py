"""The conversation of one session: its items in order, and the chat messages the engine sees.

An assistant item remembers how many audio samples each spoken clause took, so it can be cut back to
what the listener actually heard (barge-in, `conversation.item.truncate`): the model's next turn then
sees only that text.

A conversation is bounded, in items and in bytes of text, so one session cannot hold the server's memory: a client's
item that would pass the bound is refused (`has_room`), and the server's own items (a spoken turn, a reply) make
room by dropping the oldest (`make_room`), so a long spoken session never stops.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Item:
    id: str
    role: str  # user | assistant | system
    text: str | None = None  # None while a user turn's audio is still being transcribed
    audio: bool = False  # spoken (input_audio / output_audio content) rather than typed
    status: str = "completed"  # completed | in_progress | incomplete
    clauses: list[tuple[str, int]] = field(default_factory=list)  # assistant audio: (clause text, samples heard)

    @property
    def audio_samples(self) -> int:
        return sum(n for _, n in self.clauses)

    def text_until(self, samples: int) -> str:
        """The words spoken within the first `samples` of this item's audio."""
        words: list[str] = []
        for text, n in self.clauses:
            if samples >= n:
                words += text.split()
                samples -= n
            else:
                clause_words = text.split()
                words += clause_words[: int(len(clause_words) * samples / n)] if n else []
                break
        return " ".join(words)

    def to_dict(self) -> dict:
        if self.role == "assistant" and self.audio:
            content = [{"type": "output_audio", "transcript": self.text}]
        elif self.audio:
            content = [{"type": "input_audio", "transcript": self.text}]
        else:
            content = [{"type": "output_text" if self.role == "assistant" else "input_text", "text": self.text}]
        return {"id": self.id, "object": "realtime.item", "type": "message", "role": self.role, "status": self.status,
                "content": content}


MAX_ITEMS = 4096
MAX_BYTES = 1 << 20  # of text; the model sees at most a context's worth (about 32 KB for the default model)


class Conversation:
    def __init__(self, max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES):
        self.items: list[Item] = []
        self.max_items, self.max_bytes = max_items, max_bytes

    def add(self, item: Item) -> str | None:
        """Append; return the id of the item before it (the protocol's previous_item_id)."""
        previous = self.items[-1].id if self.items else None
        self.items.append(item)
        return previous

    def text_bytes(self) -> int:
        return sum(_size(it.text) for it in self.items)

    def has_room(self, text: str = "") -> bool:
        """Whether one more item holding `text` stays within the bounds."""
        return len(self.items) < self.max_items and self.text_bytes() + _size(text) <= self.max_bytes

    def make_room(self, text: str = "") -> list[Item]:
        """Drop the oldest items until one more holding `text` fits; return them, oldest first."""
        dropped: list[Item] = []
        size = self.text_bytes() + _size(text)
        while self.items and (len(self.items) >= self.max_items or size > self.max_bytes):
            dropped.append(self.items.pop(0))
            size -= _size(dropped[-1].text)
        return dropped

    def remove(self, item: Item) -> None:
        self.items.remove(item)

    def find(self, item_id: str) -> Item | None:
        return next((it for it in self.items if it.id == item_id), None)

    @property
    def last_id(self) -> str | None:
        return self.items[-1].id if self.items else None

    def messages(self, instructions: str) -> list[dict]:
        """Chat messages for the engine.

        The history stays a stable prefix from turn to turn, so the engine's latency mode, which keeps
        the last sequence's KV cache, prefills only the new turn."""
        msgs = [{"role": "system", "content": instructions}] if instructions else []
        return msgs + [{"role": it.role, "content": it.text} for it in self.items if it.text]


def _size(text: str | None) -> int:
    return len(text.encode("utf-8", "replace")) if text else 0
