"""benchmarks/host_floor.py: the floor per streamed token, its table, and its two measurements run
for real (briefly: the figures themselves are the benchmark's, not the test's)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import host_floor
from tests.conftest import ROOT


def test_the_floor_per_token_is_a_write_plus_the_steps_wake_up_shared_by_its_streams() -> None:
    floor = host_floor.Floor(wakeup_us=30.0, write_waiting_us=25.0, write_busy_us=12.0)
    assert [floor.per_token_us(n) for n in (1, 4, 8)] == [55.0, 32.5, 28.75]


def test_the_table_has_each_measurement_and_a_floor_row_per_stream_count() -> None:
    floor = host_floor.Floor(wakeup_us=30.0, write_waiting_us=25.0, write_busy_us=12.0)
    text = host_floor.markdown(floor, (1, 8), rounds=3, count=100)
    assert "| wake-up: epoll returns for another process's message, one recv (per step) | 30.0 |" in text
    assert "| write to a client that waits in recv (per streamed token) | 25.0 |" in text
    assert "| write, back to back (the client seldom waits) | 12.0 |" in text
    assert "| 1 | 55.0 |" in text and "| 8 | 28.8 |" in text
    assert "medians of 3 rounds of 100 messages" in text


@pytest.mark.skipif(sys.platform != "linux", reason="measures Linux system calls")
def test_the_measurements_read_every_message_and_cost_cpu() -> None:
    # each returns only after its peer process has sent (or read) every message: a lost one would hang
    assert host_floor.wakeup_us(20) > 0
    assert host_floor.write_us(20, pause=True) > 0
    assert host_floor.write_us(50, pause=False) > 0


def test_the_command_line_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.host_floor", "--rounds", "1", "--count", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.startswith("| what | µs of CPU |")
    assert "| 16 |" in out.stdout
