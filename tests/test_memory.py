"""ConversationMemory's bounds on stand-in conversations and clips: count, bytes, LRU order, busy owners, GC."""

from __future__ import annotations

import gc
import threading

from dycoke.memory import ConversationMemory


class Owner:
    def __init__(self, busy: bool = False) -> None:
        self.busy = busy
        self.evicted = 0

    def evict(self) -> bool:
        if self.busy:
            return False
        self.evicted += 1
        return True


class Clip:
    pass


def test_the_count_bound_evicts_the_least_recently_used_conversation():
    memory = ConversationMemory(max_conversations=2)
    a, b, c = Owner(), Owner(), Owner()
    memory.hold(a, 10)
    memory.hold(b, 10)
    memory.hold(a, 10)  # a is used again: b is now the least recently used
    memory.hold(c, 10)
    assert (a.evicted, b.evicted, c.evicted) == (0, 1, 0)
    assert memory.holds(a) and memory.holds(c) and not memory.holds(b)
    assert memory.conversations == 2 and memory.used_bytes == 20


def test_the_byte_bound_skips_a_busy_conversation_and_may_evict_the_newest():
    memory = ConversationMemory(max_bytes=100)
    busy, idle = Owner(busy=True), Owner()
    memory.hold(busy, 40)
    memory.hold(idle, 30)
    newest = Owner()
    memory.hold(newest, 50)  # 120 > 100: busy is skipped, idle goes
    assert (busy.evicted, idle.evicted, newest.evicted) == (0, 1, 0) and memory.used_bytes == 90
    alone = Owner()
    memory.hold(alone, 500)  # larger than the budget by itself: everything idle goes, itself included
    assert newest.evicted == 1 and alone.evicted == 1 and memory.used_bytes == 40


def test_features_are_computed_once_per_clip_even_from_two_threads():
    memory = ConversationMemory()
    clip = Clip()
    computed = []
    gate = threading.Barrier(2)

    def compute():
        computed.append(True)
        return "features"

    def ask():
        gate.wait()
        return memory.features(clip, False, compute, nbytes=lambda _: 8)

    results = []
    threads = [threading.Thread(target=lambda: results.append(ask())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == ["features", "features"] and computed == [True]
    # a request that needs more (VisionZip's hidden states) computes again; the richer entry then serves all
    richer = memory.features(clip, True, lambda: "with states", nbytes=lambda _: 16,
                             satisfies=lambda has: has)
    assert richer == "with states"
    assert memory.features(clip, False, compute, nbytes=lambda _: 8, satisfies=lambda has: True) == "with states"
    assert memory.used_bytes == 24


def test_entries_of_collected_owners_are_forgotten():
    memory = ConversationMemory()
    owner, clip = Owner(), Clip()
    memory.hold(owner, 10)
    memory.features(clip, False, lambda: "f", nbytes=lambda _: 5)
    del owner, clip
    gc.collect()
    assert memory.used_bytes == 0 and memory.conversations == 0
