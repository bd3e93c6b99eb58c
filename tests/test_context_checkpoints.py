"""Context checkpoints: the prompt cache of a sliding-window model whose windowed layers cache only
their window (``swa_full = false``, the default), on the demo model (Gemma 3 270M: 15 of its 18
layers slide over 512 tokens).

Two servers of the demo manifest with the test settings (tests/serving.py): the default one keeps
8 checkpoints per slot; the other none, so that it evaluates every prompt whole. A conversation
longer than the window is the case checkpoints exist for: by the second turn, the windowed
layers have dropped the cells of the first turn's prompt that the second turn's reuse needs.
"""

from __future__ import annotations

from dataclasses import replace

import openai
import pytest

from deployer.runtime.engine.checkpoints import Checkpoints
from tests.serving import GEMMA_TEST_SETTINGS, Server, gemma_config

MODEL = "gemma-3-270m"
WINDOW = 512  # gemma3.attention.sliding_window of the demo model
N_BATCH = GEMMA_TEST_SETTINGS["n_batch"]
# about 650 tokens: more than the window, so its start leaves the windowed layers' cache
NOTES = " ".join(
    f"Day {day}: the boat left at {4 + day % 3} in the morning, caught {day * 7 % 23} fish, and came back "
    f"when the wind turned {'north' if day % 2 else 'south'}."
    for day in range(1, 23)
)


def _chat(server: Server, messages: list, **options) -> openai.types.chat.ChatCompletion:
    return server.client().chat.completions.create(model=MODEL, messages=messages, temperature=0, **options)


def _conversation(server: Server, tag: str) -> tuple[list[str], list[int], list[int]]:
    """Two turns of one chat: the texts, the prompt tokens and the cached tokens of each turn."""
    messages = [{"role": "user", "content": f"Log {tag}. {NOTES} Which day was the best?"}]
    texts, prompts, cached = [], [], []
    for question in ("Why?", None):
        reply = _chat(server, messages, max_tokens=24)
        texts.append(reply.choices[0].message.content)
        prompts.append(reply.usage.prompt_tokens)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        if question:
            messages += [{"role": "assistant", "content": texts[-1]}, {"role": "user", "content": question}]
    return texts, prompts, cached


@pytest.fixture(scope="module")
def uncached_server(gemma_file, start_server_module) -> Server:
    return start_server_module(replace(gemma_config(gemma_file, **GEMMA_TEST_SETTINGS), ctx_checkpoints=0))


@pytest.fixture(scope="module")
def start_server_module(tmp_path_factory):
    from tests.serving import launch

    started: list[Server] = []

    def start(config):
        server = launch(config, tmp_path_factory.mktemp("checkpoints-server"))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.mark.model
def test_second_chat_turn_resumes_from_a_checkpoint_beyond_the_window(gemma_server):
    _, prompts, cached = _conversation(gemma_server, "resume")
    assert prompts[0] > WINDOW + N_BATCH, "the first turn must be longer than the window for this test"
    assert cached[0] == 0
    # the second turn resumes at a whole chunk of the first turn's prompt, past the window: there the
    # windowed layers' cells came from a checkpoint (the cache itself had dropped them)
    assert cached[1] > WINDOW, f"cached_tokens {cached[1]} of a {prompts[1]}-token second turn"
    assert cached[1] % N_BATCH == 0 and cached[1] <= prompts[0]


@pytest.mark.model
def test_same_text_with_and_without_checkpoints(gemma_server, uncached_server):
    """The determinism rule: a prefix restored from a checkpoint gives the text a whole evaluation gives."""
    with_cache, _, cached = _conversation(gemma_server, "same")
    without, _, uncached = _conversation(uncached_server, "same")
    assert cached[1] > 0 and uncached == [0, 0]
    assert with_cache == without


# ## The bookkeeping, without a model


def test_checkpoints_nearest_and_invalidation():
    kept = Checkpoints(slots=2, limit=4)
    for pos in (32, 64, 96):
        kept.put(0, pos, f"state@{pos}")
    assert [kept.nearest(0, p) for p in (31, 32, 95, 500)] == [0, 32, 64, 96]
    assert kept.nearest(1, 500) == 0
    kept.keep_until(0, 64)  # the slot's cache now differs after 64
    assert kept.positions(0) == [32, 64]
    kept.copy(0, 1)  # a follower's cache copied from its leader's
    assert kept.get(1, 64) == "state@64" and kept.count() == 4
    kept.clear(0)
    assert kept.positions(0) == [] and kept.positions(1) == [32, 64]


def test_checkpoints_are_bounded_and_stay_spread():
    kept = Checkpoints(slots=1, limit=4)
    for pos in range(32, 32 * 21, 32):  # 20 chunk boundaries of one long prompt
        kept.put(0, pos, pos)
    positions = kept.positions(0)
    assert len(positions) == 4
    assert positions[-1] == 640, "the newest (where the next turn resumes) is always kept"
    gaps = [b - a for a, b in zip([0, *positions], positions, strict=False)]
    assert max(gaps) <= 2 * min(gaps) + 32, f"thinned evenly: {positions}"


def test_no_checkpoints_when_the_limit_is_zero():
    kept = Checkpoints(slots=1, limit=0)
    kept.put(0, 32, "state")
    assert kept.count() == 0 and kept.nearest(0, 32) == 0


@pytest.mark.model
def test_a_checkpoint_is_the_size_the_estimate_counts_in_container_ram(gemma_file):
    """The planner's container RAM counts ctx_checkpoints × slots checkpoints of checkpoint_bytes each."""
    from deployer.estimate import EstimateSettings, checkpoint_bytes, estimate
    from deployer.gguf_header import read_header
    from deployer.runtime.llama import Model

    config = replace(gemma_config(gemma_file, **GEMMA_TEST_SETTINGS), parallel=2, n_threads=2)
    model = Model(config)
    try:
        assert model.windowed
        for start in range(0, 2 * WINDOW, N_BATCH):  # more than a window of positions in sequence 1
            model.decode([(1, list(range(1000, 1000 + N_BATCH)), start, False)])
        size = ctypes_size(model.save_window(1))
    finally:
        model.close()
    header = read_header(gemma_file)
    settings = EstimateSettings(config.n_ctx, parallel=2, backend="cpu")
    assert abs(checkpoint_bytes(header, settings) - size) <= 64, (checkpoint_bytes(header, settings), size)
    counted = estimate(header, settings).host - estimate(header, replace(settings, ctx_checkpoints=0)).host
    assert counted == 2 * 8 * checkpoint_bytes(header, settings)


def ctypes_size(state: object) -> int:
    import ctypes

    return ctypes.sizeof(state)  # type: ignore[arg-type]


@pytest.mark.model
def test_a_restored_checkpoint_gives_bitwise_the_logits_of_a_whole_evaluation(gemma_file):
    """The llama.cpp edge under the engine's rule: evaluate a prompt longer than the window in
    whole chunks, saving and at once restoring the windowed layers after each (what the engine
    does); then cut the sequence back to a checkpoint past the window, restore it, and evaluate the
    rest: the last token's logits are bit for bit those of the whole evaluation. (Without the
    restore-at-once, the restored cells sit in other places of the stream than the ones the whole
    evaluation used, attention sums them in another order, and on this project's AMD EPYC the
    logits differed by up to 1.1.)"""
    import numpy as np

    from deployer.runtime.llama import Model

    model = Model(replace(gemma_config(gemma_file, **GEMMA_TEST_SETTINGS), parallel=1, n_threads=2))
    prompt = [(i * 7919) % 20000 + 1000 for i in range(WINDOW + 8 * N_BATCH + 20)]  # within n_ctx 1024
    resume = WINDOW + 4 * N_BATCH  # a chunk boundary whose windowed cells the cache has dropped by the end

    def evaluate(start: int, states: dict) -> np.ndarray:
        pos = start
        while pos + N_BATCH < len(prompt):
            model.decode([(0, prompt[pos : pos + N_BATCH], pos, False)])
            pos += N_BATCH
            states[pos] = model.save_window(0)
            model.restore_window(0, states[pos])
        (row,) = model.decode([(0, prompt[pos:], pos, True)])
        return model.logits(row).copy()

    try:
        states: dict = {}
        model.forget(0)
        whole = evaluate(0, states)
        assert not model.can_rewind(0), "the windowed layers must have dropped position 0 for this test"
        model.forget(0, resume)
        model.restore_window(0, states[resume])
        resumed = evaluate(resume, {})
    finally:
        model.close()
    assert np.array_equal(whole, resumed), float(np.abs(whole - resumed).max())
