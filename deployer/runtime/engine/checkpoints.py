"""Context checkpoints: the sliding-window layers' cache of a slot, saved at chunk boundaries.

With ``swa_full = false`` (the default) a sliding-window layer keeps only the cells its window
still needs, so once a sequence has moved on, its cache no longer holds the state at an earlier
position: the full-attention layers can be cut back to any prefix, the windowed ones cannot. As
llama-server does (``--ctx-checkpoints``, llama.cpp PR #15293), the engine saves the windowed
layers' state of a sequence (``llama_state_seq_get_data_ext`` with
``LLAMA_STATE_SEQ_FLAGS_SWA_ONLY``) each time its prompt completes a whole ``n_batch`` chunk: the
positions the prompt cache may reuse (:mod:`deployer.runtime.engine.scheduler`). A later prompt sharing
the prefix restores the nearest checkpoint and evaluates only the rest.

This module is the bookkeeping, pure (the saved bytes are opaque here): per slot, checkpoints by
position, at most ``limit`` of them. When one more arrives, the one whose removal leaves the
smallest gap goes (never the newest: it is where a conversation's next turn resumes), so the ones
left stay spread over the prompt, a shared system prompt's boundary included.
"""

from __future__ import annotations

from typing import Any

DEFAULT_LIMIT = 8  # per slot; llama-server keeps 32, but each holds a window of every windowed layer


class Checkpoints:
    """Each slot's checkpoints, ``{position: state}``, at most ``limit`` per slot."""

    def __init__(self, slots: int, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._by_slot: list[dict[int, Any]] = [{} for _ in range(slots)]

    def positions(self, slot: int) -> list[int]:
        return sorted(self._by_slot[slot])

    def nearest(self, slot: int, pos: int) -> int:
        """The latest checkpoint of ``slot`` at or before ``pos``; 0 when there is none."""
        return max((p for p in self._by_slot[slot] if p <= pos), default=0)

    def get(self, slot: int, pos: int) -> Any:
        return self._by_slot[slot][pos]

    def put(self, slot: int, pos: int, state: Any) -> None:
        """Keep ``state`` as ``slot``'s checkpoint at ``pos``; thin the others out beyond the limit."""
        if self.limit < 1:
            return
        kept = self._by_slot[slot]
        kept[pos] = state
        while len(kept) > self.limit:
            del kept[_least_useful(sorted(kept))]

    def keep_until(self, slot: int, pos: int) -> None:
        """Forget ``slot``'s checkpoints after ``pos``: its cache now differs beyond it."""
        kept = self._by_slot[slot]
        for p in [p for p in kept if p > pos]:
            del kept[p]

    def copy(self, source: int, target: int) -> None:
        """``target``'s cache became a copy of ``source``'s: so do its checkpoints (shared, never changed)."""
        self._by_slot[target] = dict(self._by_slot[source])

    def clear(self, slot: int | None = None) -> None:
        for i in range(len(self._by_slot)) if slot is None else (slot,):
            self._by_slot[i].clear()

    def count(self) -> int:
        return sum(len(kept) for kept in self._by_slot)


def _least_useful(positions: list[int]) -> int:
    """The checkpoint (not the last) closest to the one before it (or to 0); the earlier on a tie."""
    gaps = [(pos - prev, pos) for prev, pos in zip([0, *positions], positions[:-1], strict=False)]
    return min(gaps)[1]
