"""The runtime's configuration contract and its entry point, without loading a model."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from deployer.loading import parse_manifest
from deployer.runtime import API_KEY_ENV, RuntimeConfig, runtime_config
from tests.conftest import ROOT

BASE = b'repo = "org/model-GGUF"\nfile = "model-Q8_0.gguf"\nquant = "Q8_0"\ncontext = 8192\n'


def _loaded(extra: bytes = b""):
    return parse_manifest(BASE + extra, "manifests/m.toml")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param(
            b"",
            {
                "model_name": "model-q8-0",
                "n_ctx": 8192,
                "n_batch": 512,
                "flash_attn": True,
                "chat_format": None,
                "embeddings": False,
                "parallel": 4,  # llama-server's default slot count
                "concurrency": 8,  # every slot busy and one request waiting per slot
                "n_threads": None,  # the runtime decides: the physical cores
                "require_api_key": True,
                "n_gpu_layers": -1,
            },
            id="defaults-four-slots-all-layers-on-gpu-auth-required",
        ),
        pytest.param(
            b"[server]\nparallel = 2\nthreads = 6\n",
            {"parallel": 2, "concurrency": 4, "n_threads": 6, "n_ctx": 8192},
            id="slots-and-threads-from-the-manifest-concurrency-derived",
        ),
        pytest.param(
            b"[server]\nparallel = 3\n[scaling]\nconcurrency = 3\n",
            {"parallel": 3, "concurrency": 3},
            id="concurrency-as-written-no-queue",
        ),
        pytest.param(
            b'name = "m"\n[server]\nn_batch = 256\nn_ubatch = 128\nkv_cache_type = "q8_0"\nchat_format = "chatml"\nembeddings = true\n',
            {
                "model_name": "m",
                "n_batch": 256,
                "n_ubatch": 128,
                "kv_cache_type": "q8_0",
                "chat_format": "chatml",
                "embeddings": True,
            },
            id="server-table-carried-over",
        ),
        pytest.param(
            b"[scaling]\nconcurrency = 16\n[auth]\nenabled = false\n",
            {"concurrency": 16, "parallel": 4, "require_api_key": False},
            id="concurrency-and-auth-off",
        ),
    ],
)
def test_runtime_config_from_manifest(extra: bytes, expected: dict):
    config = runtime_config(_loaded(extra), "/models/x.gguf")
    assert config.model_path == "/models/x.gguf"
    assert config.api_key is None
    for key, value in expected.items():
        assert getattr(config, key) == value, key


def test_runtime_config_takes_a_bare_manifest_and_local_overrides():
    manifest = _loaded().manifest
    config = runtime_config(manifest, "m.gguf", api_key="k", require_api_key=False)
    assert (config.model_name, config.api_key, config.require_api_key) == ("model-q8-0", "k", False)


@pytest.mark.parametrize(
    ("extra", "parallel", "n_threads", "expected"),
    [
        pytest.param(b"", 8, 4, (8, 16, 4), id="planned-slots-derive-concurrency"),
        pytest.param(b"[server]\nparallel = 2\nthreads = 6\n", 5, 3, (5, 10, 3), id="given-values-win"),
        pytest.param(b"[scaling]\nconcurrency = 12\n", 6, None, (6, 12, None), id="manifest-concurrency-kept"),
    ],
)
def test_planned_slots_and_threads_override_the_manifest(extra, parallel, n_threads, expected):
    config = runtime_config(_loaded(extra), "m.gguf", parallel=parallel, n_threads=n_threads)
    assert (config.parallel, config.concurrency, config.n_threads) == expected


@pytest.mark.parametrize(
    ("own", "env", "expected"),
    [
        pytest.param(None, {}, None, id="no-key-anywhere-means-no-auth"),
        pytest.param(None, {API_KEY_ENV: "from-env"}, "from-env", id="env-key-used"),
        pytest.param("own", {API_KEY_ENV: "from-env"}, "own", id="config-key-wins"),
        pytest.param(None, {API_KEY_ENV: "  "}, None, id="blank-env-is-unset"),
        pytest.param(" own\n", {}, "own", id="spaces-around-a-key-stripped"),
        pytest.param("  ", {API_KEY_ENV: "from-env"}, "from-env", id="blank-own-key-is-unset"),
    ],
)
def test_api_key_from_environment(own, env, expected):
    config = RuntimeConfig("m", "m.gguf", 2048, api_key=own)
    assert config.with_environment(env).api_key == expected


def test_json_round_trip_and_unknown_keys_ignored():
    config = RuntimeConfig("m", "/x.gguf", 4096, chat_format="gemma", n_threads=3, parallel=2, cpu_repack=True)
    assert RuntimeConfig.from_json(config.to_json()) == config
    newer = {**json.loads(config.to_json()), "a_field_from_a_newer_renderer": 1}
    assert RuntimeConfig.from_dict(newer) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("{", "not JSON", id="not-json"),
        pytest.param("[]", "expected a JSON object", id="not-an-object"),
        pytest.param('{"model_name": "m"}', "missing required key(s): model_path, n_ctx", id="missing-keys"),
    ],
)
def test_from_json_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        RuntimeConfig.from_json(text)


def test_kv_cache_types_are_the_manifests_with_ggml_type_ids():
    from gguf import GGMLQuantizationType

    from deployer.quants import KV_CACHE_TYPES
    from deployer.runtime.config import KV_TYPES

    assert {name: GGMLQuantizationType[name.upper()].value for name in KV_CACHE_TYPES} == KV_TYPES


def test_repr_never_shows_the_key():
    assert "s3cret" not in repr(RuntimeConfig("m", "m.gguf", 2048, api_key="s3cret"))


def test_importing_the_runtime_is_lean():
    code = (
        "import sys, deployer.runtime, deployer.runtime.protocols.checks, deployer.runtime.config\n"
        "print('\\n'.join(sys.modules))"
    )
    loaded = set(
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    )
    forbidden = {
        "modal",
        "huggingface_hub",
        "llama_cpp",
        "starlette",
        "uvicorn",
        "deployer.plan",
        "deployer.estimate",
        "deployer.render",
        "deployer.hub",
        "deployer.facts",
    }
    assert not forbidden & loaded


# ## python -m deployer.runtime: errors before any model is loaded


def _runtime(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV} | (env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "deployer.runtime", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _config_file(tmp_path: Path, **changes) -> str:
    config = replace(RuntimeConfig("m", str(tmp_path / "absent.gguf"), 2048), **changes)
    path = tmp_path / "runtime.json"
    path.write_text(config.to_json())
    return str(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({}, "absent.gguf: no such model file", id="missing-model-file"),
        pytest.param(
            {"require_api_key": True, "model_path": "README.md"},
            f"authentication is enabled but no API key is set: set {API_KEY_ENV} (or api_key)",
            id="auth-required-without-key",
        ),
    ],
)
def test_runtime_refuses_to_start(tmp_path, changes, message):
    proc = _runtime("--config", _config_file(tmp_path, **changes), "--port", "0")
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()  # one line, nothing else
    assert line.startswith("error: ") and line.endswith(message)


def test_runtime_bad_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    proc = _runtime("--config", str(bad))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {bad}: not JSON")
    proc = _runtime("--config", str(tmp_path / "none.json"))
    assert proc.returncode == 1
    assert proc.stderr == f"error: {tmp_path / 'none.json'}: cannot read: No such file or directory\n"


def test_runtime_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _runtime(
            "--config",
            _config_file(tmp_path, model_path=str(ROOT / "README.md")),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        )
    assert proc.returncode == 1
    assert f"error: port {port} on 127.0.0.1 is already in use" in proc.stderr
