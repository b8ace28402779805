"""The scheduling rules the engine's Scheduler and the simulator's replicas share (ridgeline.core.rules)."""

import pytest

from ridgeline.core.rules import (admission, blocks_fit, chunk_tokens, has_seats, make_room, prefix_pending,
                                  preemption_victim)


def test_chunks_seats_and_admission_blocks():
    assert chunk_tokens(5000, 2048) == 2048 and chunk_tokens(7, 2048) == 7
    assert has_seats(6, 2, 8) and not has_seats(7, 2, 8)
    # 3 cached blocks of 16: 48 tokens computed, the rest of a 100-token prompt in one 52-token chunk
    assert admission(100, 3, 16, 2048) == (48, 52, 4)
    assert admission(100, 3, 16, 20) == (48, 20, 2)  # a budget-sized chunk needs blocks up to 68 tokens
    assert blocks_fit(4, 2, 6) and not blocks_fit(4, 3, 6)  # reused evictable blocks leave the free count


def test_prefix_pending_waits_only_for_another_running_claimer():
    me, other = object(), object()
    assert prefix_pending(me, 2, 5, lambda j: other if j == 2 else None)
    assert not prefix_pending(me, 2, 5, lambda j: me)
    assert not prefix_pending(me, 2, 5, lambda j: None)
    assert not prefix_pending(me, 5, 5, lambda j: other)  # the whole lookup is cached


def test_preemption_takes_the_newest_unscheduled_until_the_blocks_fit():
    running, free, preempted = ["a", "b", "c", "d"], [0], []
    scheduled = {"a"}

    def preempt(s):
        running.remove(s)
        preempted.append(s)
        free[0] += 2

    def victim():
        return preemption_victim(running, scheduled.__contains__)

    assert make_room("b", lambda: free[0] >= 3, victim, preempt) == 2 and preempted == ["d", "c"]
    # a sequence that cannot fit preempts itself and stops there
    assert make_room("b", lambda: free[0] >= 100, victim, preempt) == 1 and preempted[-1] == "b"
    with pytest.raises(RuntimeError, match="cannot hold"):
        preemption_victim(["a"], scheduled.__contains__)
