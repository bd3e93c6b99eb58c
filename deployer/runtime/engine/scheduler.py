"""Continuous batching, decided: which sequences hold which slots, and what the next decode computes.

Pure bookkeeping (no llama.cpp, no threads), so it is tested without a model. The engine asks
:meth:`Scheduler.admit` and :meth:`Scheduler.step` what to do, runs the decode, samples, and
hands each decode's results back in one call, :meth:`Scheduler.update` (as vLLM v1's
``update_from_output``): the fed tokens are in the cache, each sampled token is its sequence's
next, and a sequence that ended (an end-of-generation token, or its length) leaves its slot. The
engine ends the others (a stop string, a client gone) with :meth:`Scheduler.finish`. This module
never sees logits or text.

* **Slots.** ``parallel`` slots, one sequence each, as llama-server's. A waiting sequence goes to
  the free slot whose cached tokens share the longest reusable prefix with its prompt.
* **One step: prompt chunks, then every decode token.** Chunks share a budget of ``n_batch``
  prompt tokens per step, so a long prompt is evaluated over several steps while the running
  streams keep producing a token each step; the decode tokens of all generating sequences go in
  one batch, and so do the last (partial) chunks of prompts that arrived together.
* **Results do not depend on the cache**: a prompt is cut into chunks at multiples of ``n_batch``
  from position 0, each whole chunk is decoded in a batch of its own, and only whole chunks are
  remembered for reuse. Those are exactly the batches a fresh evaluation computes, so a reused
  prefix leaves the rest of the prompt evaluated in the same batches, whatever else is running.
* **A cache of sliding windows resumes at its checkpoints.** The engine says where a slot's cache
  can be cut back to (``resumable``): anywhere for full attention, at a context checkpoint (taken
  at whole-chunk boundaries) when windowed layers cache only their window.
* **No request fails for want of cache.** Each slot has a KV stream of ``n_ctx`` cells of its own
  and no sequence is ever longer than ``n_ctx``.
* **``n`` choices share their prompt**: a request's other choices wait beside its first (the
  leader) in slots of their own and copy its cache when the prompt is done.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class State(Enum):
    WAITING = "waiting"  # queued for a slot
    FOLLOWING = "following"  # in a slot, waiting for its leader's prompt
    PROMPT = "prompt"  # its prompt is being evaluated
    DECODING = "decoding"  # generating, one token per step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One choice of one request: its prompt, its progress, its slot."""

    owner: Any  # the engine's request
    index: int  # which choice of the request
    prompt: list[int]
    max_new: int  # tokens it may generate (max_tokens, capped by the context)
    leader: Sequence | None = None  # another choice of the same request that evaluates the prompt
    state: State = State.WAITING
    slot: Slot | None = None
    n_past: int = 0  # positions whose KV is in the slot's cache
    cached: int = 0  # prompt tokens reused from the slot's cache
    trusted: int = 0  # prompt tokens computed in whole aligned chunks: reusable later
    next_token: int | None = None  # sampled, to be fed in the next step
    generated: int = 0
    followers: list[Sequence] = field(default_factory=list)
    arrival: int = 0  # set when queued: earlier requests' prompts go first
    spans: tuple[tuple[int, int], ...] = ()  # [start, end) of each image in prompt: one unit of work each

    def span_at(self, pos: int) -> tuple[int, int] | None:
        """The image that starts at ``pos``, if one does."""
        return next((span for span in self.spans if span[0] == pos), None)

    def next_span(self, pos: int) -> int:
        """Where the next image at or after ``pos`` starts (the prompt's end when none does)."""
        return next((start for start, _ in self.spans if start >= pos), len(self.prompt))


@dataclass(eq=False)
class Slot:
    id: int  # the sequence id in llama.cpp's cache
    seq: Sequence | None = None
    cache: list[int] = field(default_factory=list)  # tokens whose KV this slot holds and may reuse
    edges: list[int] = field(default_factory=list)  # where the units that computed the cache ended


@dataclass(frozen=True)
class Entry:
    """Tokens of one sequence in the next decode."""

    seq: Sequence
    tokens: list[int]
    pos: int
    logits: bool  # sample after this decode (the last prompt token, or a decode token)


@dataclass(frozen=True)
class Outcome:
    """What one sampled token did to its sequence (:meth:`Scheduler.update`)."""

    seq: Sequence
    token: int
    finish: str | None  # "stop": an end-of-generation token; "length": the sequence may generate no more


@dataclass(frozen=True)
class Admission:
    seq: Sequence
    slot: Slot
    keep: int  # cached positions kept; the engine drops the slot's cache from here on


class Scheduler:
    def __init__(
        self, parallel: int, n_ctx: int, n_batch: int, resumable: Callable[[int, int], int] | None = None
    ) -> None:
        self.slots = [Slot(i) for i in range(parallel)]
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.waiting: deque[Sequence] = deque()
        self._arrivals = 0
        # resumable(slot, keep): the latest position at or before `keep` the slot's cache can be cut
        # back to (the engine's context checkpoints, for a cache of sliding windows); `keep` by default
        self._resumable = resumable or (lambda _slot, keep: keep)

    # -- queries

    @property
    def running(self) -> list[Sequence]:
        return [slot.seq for slot in self.slots if slot.seq is not None]

    @property
    def busy(self) -> int:
        return sum(slot.seq is not None for slot in self.slots)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.busy == 0

    # -- admission

    def add(self, seqs: Iterable[Sequence]) -> None:
        """Queue the sequences of one request; the first is the leader of the others."""
        seqs = list(seqs)
        for seq in seqs:
            self._arrivals += 1
            seq.arrival = self._arrivals
        for follower in seqs[1:]:
            follower.leader = seqs[0]
            seqs[0].followers.append(follower)
        self.waiting.extend(seqs)

    def admit(self) -> list[Admission]:
        """Give free slots to waiting sequences, first come first served."""
        admitted: list[Admission] = []
        while self.waiting and any(slot.seq is None for slot in self.slots):
            seq = self.waiting.popleft()
            leader = seq.leader
            if leader is not None and leader.state in (State.WAITING, State.FOLLOWING, State.PROMPT):
                slot = self._emptiest()
                seq.state, seq.n_past = State.FOLLOWING, 0
                keep = 0
            else:
                if leader is not None:  # too late to share the prompt: evaluated on its own
                    leader.followers.remove(seq)
                    seq.leader = None
                slot, keep = self._best_slot(seq.prompt, seq.spans)
                seq.state, seq.n_past, seq.cached, seq.trusted = State.PROMPT, keep, keep, keep
            slot.seq, seq.slot = seq, slot
            slot.cache = slot.cache[:keep]
            slot.edges = [edge for edge in slot.edges if edge <= keep]
            admitted.append(Admission(seq, slot, keep))
        return admitted

    def reusable(self, slot: Slot, prompt: list[int], spans: tuple[tuple[int, int], ...] = ()) -> int:
        """Cached positions of ``slot`` that ``prompt`` may keep: whole chunks, never the last token.

        With images (``spans``), a unit's edge is a chunk's edge too: an image's start and end."""
        common = 0
        for old, new in zip(slot.cache, prompt, strict=False):
            if old != new:
                break
            common += 1
        limit = min(common, len(prompt) - 1)
        keep = limit // self.n_batch * self.n_batch
        if spans:  # an edge of the cached units that is also one of this prompt's units
            keep = max((e for e in slot.edges if e <= limit and self._is_edge(spans, e)), default=0)
        return self._resumable(slot.id, keep) if keep > 0 else 0

    def _is_edge(self, spans: tuple[tuple[int, int], ...], pos: int) -> bool:
        """Whether a fresh evaluation of a prompt with images at ``spans`` has a unit end at ``pos``:
        an image's start or end, or a multiple of n_batch outside the images."""
        if any(pos in span for span in spans):
            return True
        return pos % self.n_batch == 0 and not any(start < pos < end for start, end in spans)

    def _best_slot(self, prompt: list[int], spans: tuple[tuple[int, int], ...] = ()) -> tuple[Slot, int]:
        free = [slot for slot in self.slots if slot.seq is None]
        # the longest reusable prefix; among equals, the slot whose cache is worth least
        best = max(free, key=lambda slot: (self.reusable(slot, prompt, spans), -len(slot.cache)))
        return best, self.reusable(best, prompt, spans)

    def _emptiest(self) -> Slot:
        return min((slot for slot in self.slots if slot.seq is None), key=lambda slot: len(slot.cache))

    # -- one step

    def step(self) -> list[list[Entry]]:
        """The decodes of the next step.

        Prompt chunks, first come first, share a budget of ``n_batch`` tokens. A whole chunk (the
        only kind ever reused) gets a decode of its own, exactly as a fresh evaluation computes it;
        the last, partial chunks of prompts share one decode, then every generating sequence's next
        token goes in one more. Within a decode, sequences are in slot order: llama.cpp computes a
        run of consecutive sequence ids in one micro-batch, and splits at every gap.
        """
        batches: list[list[Entry]] = []
        partial: list[Entry] = []
        budget = self.n_batch
        for seq in self._by_arrival(State.PROMPT):
            if budget == 0:
                break
            span = seq.span_at(seq.n_past)
            if span is not None:  # an image: encoded and decoded whole, alone, with the step's whole budget
                if budget == self.n_batch:
                    batches.append([Entry(seq, seq.prompt[span[0] : span[1]], span[0], span[1] == len(seq.prompt))])
                    budget = 0
                continue
            boundary = (seq.n_past // self.n_batch + 1) * self.n_batch  # chunks never cross a multiple of n_batch
            end = min(len(seq.prompt), boundary, seq.n_past + budget, seq.next_span(seq.n_past))
            entry = Entry(seq, seq.prompt[seq.n_past : end], seq.n_past, end == len(seq.prompt))
            # a prompt with images decodes each chunk alone: the same batches whatever else runs, so
            # that the chunks after an image are as reusable as whole ones
            if len(entry.tokens) == self.n_batch or seq.spans:
                batches.append([entry])
            else:
                partial.append(entry)
            budget -= end - seq.n_past
        decodes = [Entry(seq, [seq.next_token], seq.n_past, True) for seq in self._by_arrival(State.DECODING)]
        for batch in (partial, decodes):
            if batch:
                batches.append(sorted(batch, key=lambda entry: entry.seq.slot.id if entry.seq.slot else -1))
        return batches

    def _by_arrival(self, state: State) -> list[Sequence]:
        running = [slot.seq for slot in self.slots if slot.seq is not None and slot.seq.state is state]
        return sorted(running, key=lambda seq: seq.arrival)

    def update(
        self, entries: list[Entry], sampled: list[tuple[Sequence, int]], is_eog: Callable[[int], bool]
    ) -> list[Outcome]:
        """Apply one successful decode of ``entries`` and the tokens sampled after it, in one place.

        A sequence whose token ends its generation (``is_eog``) or that reached its length is
        finished here: its slot is free for the next step. Returns one :class:`Outcome` per sampled token.
        """
        self.fed(entries)
        outcomes = []
        for seq, token in sampled:
            self.sampled(seq, token)
            finish = "stop" if is_eog(token) else "length" if seq.generated >= seq.max_new else None
            if finish is not None:
                self.finish(seq)
            outcomes.append(Outcome(seq, token, finish))
        return outcomes

    def fed(self, entries: list[Entry]) -> None:
        """The decode of ``entries`` (one batch of :meth:`step`) succeeded: their tokens are in the cache."""
        for entry in entries:
            seq = entry.seq
            if seq.state is State.PROMPT:
                assert seq.slot is not None
                if entry.pos == seq.trusted and self._whole(seq, entry):
                    seq.trusted += len(entry.tokens)
                    seq.slot.edges.append(seq.trusted)
                seq.slot.cache = seq.prompt[: seq.trusted]
            seq.n_past += len(entry.tokens)
            if seq.state is State.DECODING:
                seq.next_token = None

    def _whole(self, seq: Sequence, entry: Entry) -> bool:
        """Whether ``entry`` is a unit a fresh evaluation computes the same: a whole chunk; with
        images, also an image, or a chunk that ends where an image starts or at a multiple of n_batch."""
        if len(entry.tokens) == self.n_batch:
            return True
        if not seq.spans:
            return False
        end = entry.pos + len(entry.tokens)
        return seq.span_at(entry.pos) is not None or end % self.n_batch == 0 or seq.span_at(end) is not None

    def sampled(self, seq: Sequence, token: int) -> None:
        """``seq`` (or a follower of it) sampled ``token`` after its prompt or its last token."""
        if seq.state is State.FOLLOWING:  # its leader's prompt is now in its own cache
            assert seq.leader is not None
            seq.n_past = len(seq.prompt)
            seq.trusted = seq.leader.trusted
            assert seq.slot is not None and seq.leader.slot is not None
            seq.slot.cache = seq.prompt[: seq.trusted]
            seq.slot.edges = list(seq.leader.slot.edges)
        seq.state = State.DECODING
        seq.next_token = token
        seq.generated += 1

    def finish(self, seq: Sequence) -> None:
        """``seq`` is done (finished, failed or cancelled): its slot is free at once."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            seq.slot.seq = None
            seq.slot = None
        if seq.leader is not None and seq in seq.leader.followers:
            seq.leader.followers.remove(seq)
        for follower in seq.followers:  # its prompt will not be evaluated for them
            follower.leader = None
            if follower.state is State.FOLLOWING:
                follower.state, follower.n_past = State.PROMPT, 0
        seq.followers = []
        seq.state = State.FINISHED
