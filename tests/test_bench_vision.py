"""benchmarks/vision.py's pure helpers: the ITL windows around an image request, their statistics, its table row.

The benchmark itself starts a server and is run by hand (its smoke run: ``--projector tiny``).
"""

from __future__ import annotations

import pytest

from benchmarks import vision
from tests import ggufgen
from tests.test_vision import IMAGE_TOKENS

STEP = 0.004  # a decode step: the gap between two tokens of a running stream
STALL = 1.5  # one image encode


def _stream(before: int, after: int) -> tuple[list[float], float]:
    """``before`` tokens every STEP, one STALL, ``after`` tokens every STEP; and when the image's first
    token comes: one step after the stall (the runtime decodes the text after an image in a step of its own)."""
    times = [i * STEP for i in range(before)]
    stall_end = times[-1] + STALL
    times += [stall_end + i * STEP for i in range(after)]
    return times, stall_end + STEP


def test_split_gaps_puts_the_stall_in_the_window_during_the_image_request() -> None:
    before_tokens = 30
    sent = (before_tokens - 1) * STEP - STEP / 2  # between the last two tokens before the stall
    times, first = _stream(before_tokens, 10)
    before, during = vision.split_gaps(times, sent, first)
    assert len(before) == before_tokens - 2  # the gap across `sent` is during, not before
    assert all(gap == pytest.approx(STEP) for gap in before)
    # during: the gap across `sent`, the stall, and the step that ends with the image's first token
    assert during == pytest.approx([STEP, STALL, STEP])
    assert vision.p50_max(before, "before") == pytest.approx((STEP, STEP))
    assert vision.p50_max(during, "during") == pytest.approx((STEP, STALL))


def test_gaps_after_the_image_first_token_are_in_neither_window() -> None:
    times, _first = _stream(5, 20)
    before, during = vision.split_gaps(times, sent=times[-1] + 1, first=times[-1] + 2)
    assert len(before) == len(times) - 1 and during == []
    before, during = vision.split_gaps(times, sent=-1.0, first=-0.5)
    assert before == [] and during == []


def test_split_gaps_refuses_a_first_token_before_the_request_and_unordered_times() -> None:
    with pytest.raises(ValueError, match="before it was sent"):
        vision.split_gaps([0.0, 1.0], sent=0.5, first=0.4)
    with pytest.raises(ValueError, match="in order"):
        vision.split_gaps([0.0, 1.0, 0.5], sent=0.2, first=0.3)


def test_p50_is_the_median_and_an_empty_window_is_named() -> None:
    gaps = [0.003, 0.001, 0.002, 0.9]
    assert vision.p50_max(gaps, "during") == pytest.approx(((0.002 + 0.003) / 2, 0.9))
    with pytest.raises(ValueError, match="'before'"):
        vision.p50_max([], "before")


def test_itl_row_shows_the_stall_and_the_image_ttft() -> None:
    row = vision.itl_row(2, vision.ItlRun(before=[STEP, 2 * STEP, STEP], during=[STEP, STALL], image_ttft=STALL + 0.25))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["2", "4.0 ms", "8.0 ms", "752.0 ms", "1,500.0 ms", "2", "1,750.0 ms"]


def test_image_tokens_of_both_projectors() -> None:
    assert vision.image_tokens(ggufgen.TINY_GEMMA3_MMPROJ) == IMAGE_TOKENS
    full = vision.PROJECTORS["full"]
    assert vision.image_tokens(full) == (full.image_size // full.patch_size // 4) ** 2 == 256
