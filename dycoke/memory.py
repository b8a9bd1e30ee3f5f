"""What conversations keep between turns, bounded per process: a byte budget and a count, least recently used first.

Two kinds of entries share the byte budget:
- a conversation's KV cache (the video prefix and the turns so far), evicted by telling its owner to drop it;
- a clip's vision features, shared by every conversation on that clip whatever its method (the app's two panes).
Only conversation caches count towards `max_conversations`. An entry in use (a turn running on it) is never
evicted; it is accounted for again when the turn ends.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Protocol

DEFAULT_MAX_BYTES = 4 * 1024**3
DEFAULT_MAX_CONVERSATIONS = 32


class Evictable(Protocol):
    def evict(self) -> bool:
        """Drop what is cached; False when that is impossible right now (a turn is running)."""


class ConversationMemory:
    """An LRU over conversation caches and clip features, within `max_bytes` and `max_conversations`."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_conversations: int = DEFAULT_MAX_CONVERSATIONS) -> None:
        if max_bytes < 0 or max_conversations < 0:
            raise ValueError("memory bounds must be >= 0")
        self.max_bytes = max_bytes
        self.max_conversations = max_conversations
        self._lock = threading.Lock()
        # key -> (bytes, owner): a weak reference to a conversation, or the clip features themselves
        self._entries: OrderedDict[Hashable, tuple[int, Any]] = OrderedDict()
        self._features_ready: dict[Hashable, threading.Lock] = {}
        # Keys of entries whose owner was garbage collected. A weakref callback can run inside any allocation,
        # this thread's locked sections included, so it only appends here; locked sections purge.
        self._dead: list[Hashable] = []
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        with self._lock:
            self._purge()
            return sum(size for size, _ in self._entries.values())

    @property
    def conversations(self) -> int:
        with self._lock:
            self._purge()
            return sum(1 for key in self._entries if key[0] == "kv")

    def hold(self, conversation: Evictable, nbytes: int) -> None:
        """Account for a conversation's cache as most recently used, then evict others (or it) past the bounds."""
        key = ("kv", id(conversation))
        owner = weakref.ref(conversation, lambda _: self._dead.append(key))
        with self._lock:
            self._purge()
            self._entries[key] = (int(nbytes), owner)
            self._entries.move_to_end(key)
        self._enforce()

    def release(self, conversation: Evictable) -> None:
        """The conversation dropped its cache itself (new video, Clear)."""
        self._forget(("kv", id(conversation)))

    def holds(self, conversation: Evictable) -> bool:
        with self._lock:
            return ("kv", id(conversation)) in self._entries

    def features(self, clip: object, variant: Hashable, compute: Callable[[], Any],
                 nbytes: Callable[[Any], int], satisfies: Callable[[Hashable], bool] | None = None) -> Any:
        """The clip's features: cached ones when an entry of a `satisfies`-ing variant exists, else `compute()`.

        Computed once per clip and variant even when two threads ask at the same time. Keyed by the clip
        object's identity: the same VideoClip object must be passed for features to be shared.
        """
        matches = satisfies or (lambda other: other == variant)
        ready = self._ready_lock(id(clip))
        with ready:
            if (cached := self._cached_features(clip, matches)) is not None:
                return cached
            computed = compute()
            key = ("features", id(clip), variant)
            with self._lock:
                self._purge()
                self._entries[key] = (nbytes(computed), (weakref.ref(clip, lambda _: self._dead.append(key)),
                                                         computed))
            self._enforce()
            return computed

    def _cached_features(self, clip: object, matches: Callable[[Hashable], bool]) -> Any:
        with self._lock:
            self._purge()
            for key, (_, held) in reversed(self._entries.items()):
                if key[0] == "features" and key[1] == id(clip) and held[0]() is clip and matches(key[2]):
                    self._entries.move_to_end(key)
                    return held[1]
        return None

    def _ready_lock(self, clip_id: int) -> threading.Lock:
        with self._lock:
            return self._features_ready.setdefault(clip_id, threading.Lock())

    def _forget(self, key: Hashable) -> None:
        with self._lock:
            self._purge()
            self._entries.pop(key, None)

    def _purge(self) -> None:
        while self._dead:
            key = self._dead.pop()
            self._entries.pop(key, None)
            if key[0] == "features":
                self._features_ready.pop(key[1], None)

    def _over(self) -> bool:
        total = sum(size for size, _ in self._entries.values())
        count = sum(1 for key in self._entries if key[0] == "kv")
        return total > self.max_bytes or count > self.max_conversations

    def _enforce(self) -> None:
        """Evict least recently used entries until within bounds; conversations in use are skipped."""
        skipped: set[Hashable] = set()
        while True:
            with self._lock:
                self._purge()
                if not self._over():
                    return
                count = sum(1 for key in self._entries if key[0] == "kv")
                over_count = count > self.max_conversations
                victim = next((key for key in self._entries if key not in skipped
                               and (not over_count or key[0] == "kv")), None)
                if victim is None:
                    return
                _, owner = self._entries[victim]
                if victim[0] == "features":
                    del self._entries[victim]
                    self.evictions += 1
                    continue
            conversation = owner()  # outside the lock: the owner's evict() may take its own lock
            if conversation is None or conversation.evict():
                self._forget(victim)
                with self._lock:
                    self.evictions += 1
            else:
                skipped.add(victim)
