"""A simulated GPU's scheduling: ``max_num_seqs`` sequences at once with a waiting queue behind
them, and a prefix cache of prompt blocks, as vLLM and SGLang schedule.

The prompt is cut into blocks of ``BLOCK_TOKENS`` words (the devnode's tokens); each block is named
by the hash of every word up to its end, so a block is only reused after the very same prefix.
A prefill finds how many leading blocks are cached (the rest is the uncached prompt, which sets
the time to first token: ``ttft_ms + prompt_token_ms`` per uncached token), then caches them all,
dropping the least recently used blocks beyond the cache's size. Pure bookkeeping: no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

#: Words per cached block (vLLM's default block size is 16 tokens).
BLOCK_TOKENS = 16


def prompt_words(body: bytes) -> list[str]:
    """The prompt's words in order: each chat message's role and text, or the completion prompt."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(document, dict):
        return []
    words: list[str] = []
    messages = document.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if isinstance(message, dict):
                words.append(f"<{message.get('role')}>")
                words += _text_of(message.get("content")).split()
    elif isinstance(document.get("prompt"), str):
        words += document["prompt"].split()
    return words


def _text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return " ".join(text for text in texts if isinstance(text, str))
    return ""


def block_names(words: Sequence[str]) -> list[bytes]:
    """The names of the prompt's whole blocks, in order (each covers the prefix up to its end)."""
    names = []
    running = hashlib.blake2b(digest_size=16)
    for start in range(0, len(words) - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        running.update("\x00".join(words[start:start + BLOCK_TOKENS]).encode() + b"\x01")
        names.append(running.copy().digest())
    return names


class Gpu:
    """Sequences running, the queue waiting for a slot, and the prefix cache (see the module)."""

    def __init__(self) -> None:
        self.running = 0
        self._queue: deque[Callable[[], None]] = deque()
        self._cache: OrderedDict[bytes, None] = OrderedDict()
        self.prompt_tokens = 0
        self.cached_tokens = 0

    @property
    def waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._queue)

    def admit(self, max_num_seqs: int, start: Callable[[], None]) -> Callable[[], None]:
        """Run ``start`` now if a slot is free, else once one is; returns a function that takes the
        request out of the queue (for a client gone while waiting; harmless once started)."""
        if self.running < max_num_seqs and not self._queue:
            self.running += 1
            start()
            return lambda: None
        self._queue.append(start)
        return lambda: self._queue.remove(start) if start in self._queue else None

    def release(self, max_num_seqs: int) -> None:
        """A running sequence ended: its slot goes to the next waiting request, if any."""
        self.running -= 1
        while self._queue and self.running < max_num_seqs:
            self.running += 1
            self._queue.popleft()()

    def prefill(self, words: Sequence[str], capacity_blocks: int) -> int:
        """How many of the prompt's tokens are not cached; the prompt's blocks are cached after."""
        names = block_names(words)
        cached = 0
        for name in names:
            if name not in self._cache:
                break
            cached += 1
        for name in names:
            self._cache[name] = None
            self._cache.move_to_end(name)
        while len(self._cache) > capacity_blocks:
            self._cache.popitem(last=False)
        uncached = len(words) - cached * BLOCK_TOKENS
        self.prompt_tokens += len(words)
        self.cached_tokens += cached * BLOCK_TOKENS
        return uncached
