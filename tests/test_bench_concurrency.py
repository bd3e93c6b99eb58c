"""benchmarks/concurrency.py's pure parts: /proc parsing, the per-token arithmetic, combining runs,
the command line, the fast regime's logit bias and the launcher's thread record.

The benchmark itself needs real servers and a quiet machine; what it computes from its readings is
checked here on fixed inputs, and its readers against the real sources (this process's /proc files,
the runtime's own /metrics text), so that a renamed counter or a miscounted /proc field fails here
rather than printing wrong tables.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks import concurrency as bench
from deployer.runtime import RuntimeConfig
from tests import ggufgen
from tests.conftest import ROOT

LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def stat_line(name: str, utime: int, stime: int) -> str:
    """A /proc/<pid>/task/<tid>/stat line: pid, (name), then fields 3..52 with utime/stime at 14/15."""
    fields = ["S", *[str(100 + i) for i in range(4, 53)]]  # fields 3..52
    fields[14 - 3], fields[15 - 3] = str(utime), str(stime)
    return f"4242 ({name}) {' '.join(fields)}\n"


@pytest.mark.parametrize("name", ["python", "gguf-deploy-mod", "a (b) c", "x)"])
def test_stat_ticks_counts_fields_after_the_last_parenthesis(name: str) -> None:
    assert bench.stat_ticks(stat_line(name, utime=17, stime=5)) == 22


def test_schedstat_ns_is_the_first_field() -> None:
    assert bench.schedstat_ns("336808079 77729602 30\n") == 336808079


@LINUX_PROC
def test_thread_cpu_reads_this_thread_as_the_kernel_counts_it() -> None:
    """The fields read are this thread's CPU time: they grow as time.thread_time() does."""
    pid, tid = os.getpid(), threading.get_native_id()
    tick = os.sysconf("SC_CLK_TCK")
    before, thread_before = bench.thread_cpu(pid, tid), time.thread_time()
    while time.thread_time() - thread_before < 0.2:  # burn 0.2 s of CPU on this thread
        pass
    after, spent = bench.thread_cpu(pid, tid), time.thread_time() - thread_before
    assert abs((after.ticks - before.ticks) / tick - spent) < 0.05  # ticks are sampled: a few of them off
    if before.ns is not None and after.ns is not None:
        assert abs((after.ns - before.ns) / 1e9 - spent) < 0.02


@LINUX_PROC
def test_others_cpu_counts_every_thread_but_the_main_one() -> None:
    """llama-server's HTTP side: a thread that burns CPU is counted, the main thread's CPU is not."""
    pid, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    burnt, release = threading.Event(), threading.Event()

    def burn() -> None:
        start = time.thread_time()
        while time.thread_time() - start < 0.3:
            pass

    def worker() -> None:
        burn()
        burnt.set()
        release.wait(30)  # alive while it is read: /proc forgets an ended thread

    before = bench.others_cpu(pid)
    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert burnt.wait(30)
        middle = bench.others_cpu(pid)
        burn()  # the main thread's: not counted
        after = bench.others_cpu(pid)
    finally:
        release.set()
        thread.join()
    assert (middle.ticks - before.ticks) / tick > 0.2
    assert (after.ticks - middle.ticks) / tick < 0.1


def test_engine_seconds_reads_the_runtimes_own_metrics_text() -> None:
    """The regex against what deployer.runtime.metrics renders, not against a copy of its format."""
    pytest.importorskip("prometheus_client")
    from deployer.runtime.metrics import STAGES, Metrics

    assert bench.STAGES == STAGES
    metrics = Metrics()
    for index, stage in enumerate(STAGES):
        metrics.engine_seconds[stage].inc(0.125 * (index + 1))
    body, _ = metrics.render()
    assert bench.engine_seconds(body.decode()) == {stage: 0.125 * (i + 1) for i, stage in enumerate(STAGES)}


def test_engine_seconds_is_zero_for_stages_not_reported() -> None:
    text = '# TYPE gguf_deploy_engine_seconds_total counter\ngguf_deploy_engine_seconds_total{stage="decode"} 2.5\n'
    assert bench.engine_seconds(text) == {"decode": 2.5, "sample": 0.0, "schedule": 0.0, "text": 0.0, "handover": 0.0}


def snapshot(loop: tuple[int, int | None], model: tuple[int, int | None], **stages: float) -> bench.Snapshot:
    return bench.Snapshot(
        bench.CpuTime(*loop), bench.CpuTime(*model), {stage: stages.get(stage, 0.0) for stage in bench.STAGES}
    )


def test_per_token_divides_the_differences_by_the_tokens() -> None:
    before = snapshot((10, 1_000_000), (20, 5_000_000), decode=1.0, sample=0.5, handover=0.25)
    after = snapshot((13, 3_000_000), (30, 45_000_000), decode=1.4, sample=0.502, handover=0.2504)
    cost = bench.per_token(before, after, tokens=200, ticks_per_s=100)
    assert cost["tokens"] == 200
    assert cost["loop_cpu_us"] == pytest.approx(2e6 / 1e9 * 1e6 / 200)  # 10 µs, from schedstat
    assert cost["model_cpu_us"] == pytest.approx(40e6 / 1e9 * 1e6 / 200)  # 200 µs
    assert cost["loop_cpu_us_stat"] == pytest.approx(3 / 100 * 1e6 / 200)  # 150 µs, from 3 ticks
    assert cost["model_cpu_us_stat"] == pytest.approx(10 / 100 * 1e6 / 200)
    assert cost["stages_us"]["decode"] == pytest.approx(0.4 * 1e6 / 200)
    assert cost["stages_us"]["sample"] == pytest.approx(0.002 * 1e6 / 200)
    assert cost["stages_us"]["schedule"] == 0
    assert cost["host_us"] == pytest.approx((0.002 + 0.0004) * 1e6 / 200)  # every stage but decode


def test_per_token_falls_back_to_ticks_and_is_nan_without_tokens() -> None:
    before, after = snapshot((10, None), (20, None)), snapshot((12, None), (24, None))
    assert bench.per_token(before, after, tokens=100, ticks_per_s=100)["loop_cpu_us"] == pytest.approx(200.0)
    empty = bench.per_token(before, after, tokens=0, ticks_per_s=100)
    assert math.isnan(empty["loop_cpu_us"])
    assert math.isnan(empty["stages_us"]["decode"])


def test_combine_sums_counts_and_takes_medians_of_the_rest() -> None:
    runs = [
        {
            "clients": 4,
            "requests": 4,
            "tokens": 512,
            "tokens_per_s": rate,
            "breakdown": {"tokens": 512, "host_us": host},
        }
        for rate, host in ((100.0, 30.0), (300.0, 10.0), (200.0, 20.0))
    ]
    combined = bench.combine(runs)
    assert combined == {
        "clients": 4,
        "requests": 12,
        "tokens": 1536,
        "tokens_per_s": 200.0,
        "breakdown": {"tokens": 1536, "host_us": 20.0},
    }
    two = bench.combine(runs[:2])  # an even number of runs: the median of two is their mean
    assert two["tokens_per_s"] == 200.0
    assert two["clients"] == 4 and isinstance(two["clients"], int)  # not 4.0 in the tables


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 21)]
    assert bench.percentile(values, 50) == 10.0
    assert bench.percentile(values, 95) == 19.0
    assert math.isnan(bench.percentile([], 50))


def test_count_tokens_counts_words_only_in_the_fast_regime() -> None:
    pieces = [" w655 w3", " w1", " w17"]  # a server may send two tokens in one chunk
    assert bench.count_tokens(len(pieces), pieces, count_words=True) == 4
    assert bench.count_tokens(len(pieces), pieces, count_words=False) == 3


@pytest.mark.parametrize(("slots", "expected"), [(4, (1, 4, 8)), (8, (1, 4, 8, 16)), (2, (1, 4))])
def test_levels_for_never_exceeds_twice_the_slots(slots: int, expected: tuple[int, ...]) -> None:
    assert bench.levels_for(bench.FAST_LEVELS, slots) == expected


def test_parse_args_defaults_follow_the_regime() -> None:
    demo = bench.parse_args([])
    assert (demo.regime, demo.levels, demo.slots, demo.runs) == ("demo", bench.LEVELS, (bench.SLOTS,), 1)
    assert demo.servers == list(bench.SERVER_KEYS.values())
    fast = bench.parse_args(["--regime", "fast", "--runs", "3", "--servers", "ours,example"])
    assert (fast.levels, fast.slots, fast.runs) == (bench.FAST_LEVELS, bench.FAST_SLOTS, 3)
    assert fast.servers == [bench.OURS, bench.EXAMPLE]
    chosen = bench.parse_args(["--regime", "fast", "--slots", "8", "--levels", "1,16"])
    assert (chosen.slots, chosen.levels) == ((8,), (1, 16))


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--slots", "4,x"], "'4,x'"),
        (["--levels", "0,4"], "'0,4'"),
        (["--servers", "ours,vllm"], "vllm"),
        (["--runs", "0"], "--runs"),
        (["--regime", "fast", "--model-path", "m.gguf"], "--model-path"),
        (["--regime", "slow"], "'slow'"),
    ],
)
def test_parse_args_refuses_naming_the_value(argv: list[str], named: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench.parse_args(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_fast_bias_bans_every_token_but_the_word_pieces(tmp_path: Path) -> None:
    path = ggufgen.write_gguf(tmp_path / "tiny.gguf", ggufgen.TINY_LLAMA, header_only=True)
    bias = bench.fast_bias(path)
    banned = {int(token) for token in bias}
    assert 2 in banned  # EOS (ggufgen's SPM vocabulary: <unk>, <s>, </s>, the 256 bytes, then ▁w<i>)
    assert banned == set(range(3 + 256))
    assert set(bias.values()) == {bench.BIAS}


def test_fast_bias_refuses_a_vocabulary_whose_tokens_are_not_words(tmp_path: Path) -> None:
    spec = replace(ggufgen.TINY_LLAMA, tokenizer="gpt2")  # normal tokens "tok<i>": no ▁ word pieces
    path = ggufgen.write_gguf(tmp_path / "bpe.gguf", spec, header_only=True)
    with pytest.raises(SystemExit, match=r"bpe\.gguf: token 0 \('tok0'\)"):
        bench.fast_bias(path)


def test_every_batching_server_gets_the_same_slots_and_context_per_slot() -> None:
    config = RuntimeConfig(model_name="m", model_path="/m.gguf", n_ctx=1024, parallel=8, n_threads=2)
    model = bench.example_settings(config, 9999)["model"]
    assert (model["n_seq_max"], model["n_ctx"], model["kv_unified"]) == (8, 8 * 1024, False)
    assert (model["threads"], model["threads_batch"], model["store_logits"]) == (bench.THREADS, bench.THREADS, False)
    command = bench.llama_server_command("llama-server", config, 9999, no_repack=False)
    assert command[command.index("-np") + 1] == "8"
    assert command[command.index("-c") + 1] == str(8 * 1024)
    assert "--no-kv-unified" in command


def test_the_launcher_runs_a_script_with_its_arguments(tmp_path: Path) -> None:
    script = tmp_path / "server.py"
    script.write_text("import sys\nprint(sys.argv[1:])\n")
    command = bench.python_module(str(script), ["-C", "x.json"], no_repack=True)
    assert command[:3] == [sys.executable, "-c", bench.LAUNCHER]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "['-C', 'x.json']"


def test_the_model_thread_is_found_by_its_name_in_the_engine_process(tmp_path: Path) -> None:
    """What the benchmark finds the model thread by: the OS name the engine gives it, in a child process."""
    child = (
        "import sys, threading, time\n"
        "from deployer.runtime.engine.core import _name_thread\n"
        "def work():\n"
        "    _name_thread(sys.argv[1])\n"
        "    print(threading.get_native_id(), flush=True)\n"
        "    time.sleep(30)\n"
        "threading.Thread(target=work, daemon=True).start()\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}, sys.argv[1]])",
         bench.MODEL_THREAD],
        stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert parent.stdout is not None
        tid = int(parent.stdout.readline())
        owner, found = bench.named_thread(parent.pid, bench.MODEL_THREAD)
        assert found == tid and owner != parent.pid
        with pytest.raises(RuntimeError, match=f"process {parent.pid}: no thread named nobody"):
            bench.named_thread(parent.pid, "nobody")
    finally:
        parent.kill()
        parent.wait()
        subprocess.run(["pkill", "-f", "_name_thread.sys.argv"], check=False)  # the grandchild


def test_without_the_launcher_a_script_runs_as_itself() -> None:
    assert bench.python_module("/x/server.py", ["-C", "c.json"], no_repack=False) == [
        sys.executable,
        "/x/server.py",
        "-C",
        "c.json",
    ]
    assert bench.python_module("llama_cpp.server", [], no_repack=False) == [sys.executable, "-m", "llama_cpp.server"]


def level(clients: int, rate: float, breakdown: bool) -> dict[str, object]:
    row: dict[str, object] = {
        "clients": clients, "requests": clients, "tokens": 128 * clients, "tokens_per_s": rate,
        "ttft_p50_ms": 20.0, "ttft_p95_ms": 30.0, "full_length": clients, "refused": 0, "failed": 0, "load_1min": 1.0,
    }  # fmt: skip
    if breakdown:
        stages = dict.fromkeys(bench.STAGES, 1.0)
        row["breakdown"] = {
            "tokens": 128 * clients,
            "loop_cpu_us": 50.0,
            "model_cpu_us": 80.0,
            "stages_us": stages,
            "host_us": 4.0,
        }
    return row


def report(regime: str, slots: tuple[int, ...]) -> dict[str, object]:
    blocks = [
        {
            "slots": n,
            "levels": (1, 4),
            "servers": {
                bench.OURS: [level(1, 100.0, True), level(4, 300.0, True)],
                bench.LLAMA_SERVER: [level(1, 110.0, False), level(4, 330.0, False)],
            },
        }
        for n in slots
    ]
    return {
        "regime": regime, "blocks": blocks, "batched_bench_tokens_per_s": {"1": 120.0, "4": 400.0}, "max_tokens": 128,
        "runs": 3, "cpu_clock": "schedstat", "date": "d", "machine": "m", "cpu": "c", "llama_cpp_python": "v",
        "model": "f.gguf", "n_ctx_per_slot": 1024, "threads": 2, "requests_per_client": 3, "repack": True, "seconds": 1,
    }  # fmt: skip


def test_markdown_demo_keeps_its_layout_and_fast_adds_a_block_per_slot_count() -> None:
    demo = bench.markdown(report("demo", (4,)))
    assert demo.startswith("| clients | gguf-deploy runtime: tok/s | TTFT p50 / p95 ms | llama-server: tok/s |")
    assert "| 4 | 0.91× | 1.00× |" in demo  # ours ÷ llama-server at 4 clients: 300 / 330
    fast = bench.markdown(report("fast", (4, 8)))
    assert fast.startswith("**4 slots**") and "**8 slots**" in fast
    breakdown = [line for line in fast.splitlines() if line.startswith("| process | 8 | 4 | 512 |")]
    assert breakdown == ["| process | 8 | 4 | 512 | 50.0 | 80.0 | 1.0 | 1.0 | 1.0 | 1.0 | 1.0 | 4.0 |"]


def test_the_http_side_table_puts_our_event_loop_beside_llama_servers_http_threads() -> None:
    fast = report("fast", (4,))
    assert "HTTP threads" not in bench.markdown(fast)  # llama-server ran with more than one thread: no figure
    for block in fast["blocks"]:  # type: ignore[union-attr]
        for i, row in enumerate(block["servers"][bench.LLAMA_SERVER]):
            row["http_cpu_us"] = 70.0 + i
    lines = bench.markdown(fast).splitlines()
    assert "| slots | clients | ours, event loop (engine process) | llama-server, HTTP threads |" in lines
    assert "| 4 | 1 | 50.0 | 70.0 |" in lines and "| 4 | 4 | 50.0 | 71.0 |" in lines
