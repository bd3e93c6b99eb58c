"""The batching scheduler, with no model: feed it requests and fake decode results, check each step."""

from __future__ import annotations

import pytest

from deployer.runtime.engine.scheduler import Scheduler, Sequence, State

EOG = 2  # the end-of-generation token of these tests


def seqs(owner: str, prompt: list[int], n: int = 1, max_new: int = 8) -> list[Sequence]:
    return [Sequence(owner, i, prompt, max_new) for i in range(n)]


def run_step(scheduler: Scheduler, token: int = 7) -> list[tuple[str, int, int, bool]]:
    """One step: admit, plan, 'decode' each batch, sample ``token`` for every row that asked for logits."""
    scheduler.admit()
    batches = scheduler.step()
    for batch in batches:
        sampled = []
        for entry in (e for e in batch if e.logits):
            if entry.seq.state is State.PROMPT:  # its waiting choices sample the same row
                sampled += [(f, token) for f in entry.seq.followers if f.state is State.FOLLOWING]
            sampled.append((entry.seq, token))
        scheduler.update(batch, sampled, is_eog=lambda t: t == EOG)
    return [(e.seq.owner, e.seq.index, len(e.tokens), e.logits) for batch in batches for e in batch]


def drain(scheduler: Scheduler) -> None:
    for _ in range(1000):
        if scheduler.idle:
            return
        run_step(scheduler)
    raise AssertionError("the scheduler never went idle")


def test_a_long_prompt_is_chunked_beside_running_decodes():
    s = Scheduler(parallel=2, n_ctx=4096, n_batch=512)
    s.add(seqs("short", [1, 2, 3], max_new=100))
    assert run_step(s) == [("short", 0, 3, True)]
    s.add(seqs("long", list(range(1200))))
    # the long prompt goes first (its chunk starts the batch), the running stream still gets its token
    assert run_step(s) == [("long", 0, 512, False), ("short", 0, 1, True)]
    assert run_step(s) == [("long", 0, 512, False), ("short", 0, 1, True)]
    assert run_step(s) == [("long", 0, 176, True), ("short", 0, 1, True)]
    assert run_step(s) == [("short", 0, 1, True), ("long", 0, 1, True)]


def test_prompt_chunks_share_one_budget_first_come_first_served():
    s = Scheduler(parallel=3, n_ctx=4096, n_batch=512)
    s.add(seqs("a", list(range(400))))
    s.add(seqs("b", list(range(1000, 1300))))
    assert run_step(s) == [("a", 0, 400, True), ("b", 0, 112, False)]  # each chunk in a decode of its own
    # b's next chunk stops at the n_batch boundary of its own positions, never across it
    assert run_step(s)[0] == ("b", 0, 188, True)


def test_waiting_requests_get_slots_as_they_free_up():
    s = Scheduler(parallel=1, n_ctx=4096, n_batch=512)
    s.add(seqs("a", [1, 2], max_new=2))
    s.add(seqs("b", [3, 4], max_new=2))
    assert run_step(s) == [("a", 0, 2, True)]
    assert [q.owner for q in s.waiting] == ["b"]
    assert run_step(s) == [("a", 0, 1, True)]  # a reaches max_new: its slot is free at once
    assert run_step(s) == [("b", 0, 2, True)]


def test_n_choices_share_the_prompt_of_their_leader():
    s = Scheduler(parallel=4, n_ctx=4096, n_batch=512)
    s.add(seqs("a", list(range(10)), n=3))
    # only the leader evaluates the prompt; the others follow in their own slots
    assert run_step(s) == [("a", 0, 10, True)]
    assert [q.state for q in s.running] == [State.DECODING] * 3
    assert all(q.n_past == 10 for q in s.running)
    assert sorted(e[1] for e in run_step(s)) == [0, 1, 2]


def test_choices_beyond_the_free_slots_evaluate_the_prompt_themselves():
    s = Scheduler(parallel=2, n_ctx=4096, n_batch=512)
    s.add(seqs("a", list(range(10)), n=3, max_new=1))
    assert run_step(s) == [("a", 0, 10, True)]  # two slots: the leader and one follower, both done after 1 token
    assert run_step(s) == [("a", 2, 10, True)]  # the third choice, alone, with no leader left


def test_a_new_request_takes_the_slot_with_the_longest_reusable_prefix():
    s = Scheduler(parallel=2, n_ctx=8192, n_batch=4)
    first = list(range(100, 110))
    s.add(seqs("a", first, max_new=1))
    drain(s)
    other = list(range(200, 210))
    s.add(seqs("b", other, max_new=1))
    drain(s)
    # a's prompt was computed in whole chunks of 4 from position 0: 8 of its 10 tokens are reusable
    s.add(seqs("c", [*first, 1, 2, 3]))
    admitted = s.admit()
    assert admitted[0].slot.id == 0 and admitted[0].keep == 8
    assert s.step()[0][0].tokens == [*first[8:], 1, 2]  # up to the next multiple of n_batch


def test_reuse_never_covers_the_whole_prompt_and_is_whole_chunks_only():
    s = Scheduler(parallel=1, n_ctx=8192, n_batch=4)
    prompt = list(range(8))
    s.add(seqs("a", prompt, max_new=1))
    drain(s)
    assert s.reusable(s.slots[0], prompt) == 4  # at least the last token is evaluated again
    assert s.reusable(s.slots[0], [*prompt[:6], 99, 98]) == 4
    assert s.reusable(s.slots[0], [0, 1, 2, 99, 98]) == 0


def test_only_whole_chunks_are_remembered():
    s = Scheduler(parallel=2, n_ctx=8192, n_batch=4)
    s.add(seqs("a", list(range(2))))
    s.add(seqs("b", list(range(10, 22)), max_new=1))
    run_step(s)  # a takes 2 tokens of the budget: b's first chunk is cut short, not remembered
    slot_b = next(slot for slot in s.slots if slot.seq and slot.seq.owner == "b")
    assert slot_b.cache == []
    run_step(s)  # b: positions 2..3, up to the boundary; then whole chunks
    run_step(s)
    assert slot_b.cache == []  # a chunk that did not start at a trusted position never counts
    assert s.reusable(slot_b, list(range(10, 22))) == 0


def test_a_sliding_window_cache_that_lost_position_0_is_never_reused():
    s = Scheduler(parallel=1, n_ctx=8192, n_batch=4, resumable=lambda slot, keep: 0)
    s.add(seqs("a", list(range(10)), max_new=1))
    drain(s)
    assert s.reusable(s.slots[0], list(range(10))) == 0


def test_a_sliding_window_cache_resumes_at_its_latest_checkpoint():
    checkpoints = {0: {4}}  # the engine kept the window's state at position 4 only
    s = Scheduler(
        parallel=1,
        n_ctx=8192,
        n_batch=4,
        resumable=lambda slot, keep: max(p for p in {0} | checkpoints[slot] if p <= keep),
    )
    s.add(seqs("a", list(range(14)), max_new=1))
    drain(s)
    assert s.slots[0].cache == list(range(12))  # three whole chunks could be reused...
    assert s.reusable(s.slots[0], list(range(14))) == 4  # ...but only the checkpointed one is
    s.add(seqs("b", list(range(14)), max_new=1))
    (admission,) = s.admit()
    assert admission.keep == admission.seq.cached == 4 and admission.slot.cache == list(range(4))


def test_finishing_a_leader_early_lets_its_followers_evaluate_the_prompt():
    s = Scheduler(parallel=3, n_ctx=4096, n_batch=4)
    group = seqs("a", list(range(10)), n=2)
    s.add(group)
    s.admit()
    s.step()
    s.finish(group[0])  # cancelled mid-prompt
    assert group[1].state is State.PROMPT and group[1].n_past == 0
    assert s.step()[0][0].seq is group[1]


@pytest.mark.parametrize("parallel", [1, 4, 8])
def test_no_sequence_ever_outgrows_its_context(parallel):
    n_ctx = 64
    s = Scheduler(parallel=parallel, n_ctx=n_ctx, n_batch=16)
    groups = [seqs(f"r{i}", list(range(40 + i)), max_new=n_ctx - 40 - i) for i in range(parallel * 2)]
    for group in groups:
        s.add(group)
    for _ in range(500):
        if s.idle:
            break
        run_step(s)
        assert all(seq.n_past <= n_ctx for seq in s.running)
        assert sum(seq.n_past for seq in s.running) <= parallel * n_ctx
    assert s.idle
    assert all(g[0].generated == g[0].max_new for g in groups)


def test_update_applies_a_decode_and_ends_sequences_by_token_and_by_length():
    s = Scheduler(parallel=3, n_ctx=4096, n_batch=512)
    s.add(seqs("eog", [1, 3, 4]))
    s.add(seqs("short", [5, 6], max_new=1))
    s.add(seqs("runs", [8, 9]))
    s.admit()
    (batch,) = s.step()
    by_owner = {e.seq.owner: e.seq for e in batch}
    outcomes = s.update(
        batch, [(by_owner["eog"], EOG), (by_owner["short"], 7), (by_owner["runs"], 7)], lambda t: t == EOG
    )
    assert [(o.seq.owner, o.token, o.finish) for o in outcomes] == [
        ("eog", EOG, "stop"),
        ("short", 7, "length"),
        ("runs", 7, None),
    ]
    # the ended ones left their slots in the same call; their prompts stay cached for reuse
    assert [seq.owner for seq in s.running] == ["runs"]
    assert by_owner["eog"].state is State.FINISHED and by_owner["eog"].slot is None
    assert sorted(len(slot.cache) for slot in s.slots) == [0, 0, 0]  # partial chunks are never trusted
    assert by_owner["runs"].next_token == 7 and by_owner["runs"].n_past == 2
