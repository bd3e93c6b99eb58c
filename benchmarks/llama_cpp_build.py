"""Build llama.cpp's ``llama-server`` and ``llama-batched-bench`` from llama-cpp-python's source release.

The benchmarks compare this project's runtime with llama.cpp's own server. For the comparison to be
fair, both must run the same llama.cpp compiled the same way: this script takes the llama.cpp that
llama-cpp-python's source release vendors (the version installed here, i.e. the one the runtime links)
and configures it through llama-cpp-python's own top-level ``CMakeLists.txt``, with what its
scikit-build-core build sets: a Release build, shared libraries, no curl, ``GGML_NATIVE`` left at its
default (on), plus whatever ``CMAKE_ARGS`` holds, as ``pip install llama-cpp-python`` honours it
(``CMAKE_ARGS="-DGGML_CUDA=on"`` for a CUDA build). The only additions select the two tools and keep
the build offline (no web UI download, no OpenSSL).

Built once, cached under ``~/.cache/gguf-deploy/llama.cpp-<version>[-<flags hash>]/``; a second run
finds ``build-info.json`` there and only prints the paths. The source release comes from ``--sdist``,
from the cache, or from ``pip download --no-deps --no-binary :all: llama-cpp-python==<version>``.

    .venv/bin/python -m benchmarks.llama_cpp_build            # prints llama-server=... and llama-batched-bench=...
    .venv/bin/python -m benchmarks.llama_cpp_build --json
    CMAKE_ARGS="-DGGML_CUDA=on" .venv/bin/python -m benchmarks.llama_cpp_build
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

PACKAGE = "llama-cpp-python"
TARGETS = ("llama-server", "llama-batched-bench")
CACHE_ROOT = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gguf-deploy"
INFO = "build-info.json"

# What llama-cpp-python's build sets (its CMakeLists.txt forces LLAMA_CURL off and shared libraries;
# scikit-build-core builds Release), then what selects the tools and keeps the build offline.
# LLAVA_BUILD is off because LLAMA_BUILD_TOOLS adds tools/mtmd itself (the package adds it a second time).
PACKAGE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF")
TOOL_FLAGS = (
    "-DLLAVA_BUILD=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the build downloads the web UI from a Hugging Face bucket
    "-DLLAMA_OPENSSL=OFF",
)


@dataclass(frozen=True)
class Build:
    version: str
    llama_server: str
    llama_batched_bench: str
    cmake_args: list[str]
    build_seconds: float


def installed_version() -> str:
    """The llama-cpp-python the runtime links: the release whose vendored llama.cpp to build."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        sys.exit(f"{PACKAGE} is not installed here; pass --version X.Y.Z")


def cmake_args() -> list[str]:
    return [*PACKAGE_FLAGS, *TOOL_FLAGS, *shlex.split(os.environ.get("CMAKE_ARGS", ""))]


def build_dir(version: str, extra: str) -> Path:
    """One folder per version, and per ``CMAKE_ARGS`` when set (a CUDA build beside the CPU one)."""
    suffix = f"-{hashlib.sha256(extra.encode()).hexdigest()[:8]}" if extra.strip() else ""
    return CACHE_ROOT / f"llama.cpp-{version}{suffix}"


def cached(folder: Path) -> Build | None:
    try:
        build = Build(**json.loads((folder / INFO).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return build if Path(build.llama_server).is_file() and Path(build.llama_batched_bench).is_file() else None


def source_release(version: str, folder: Path, sdist: Path | None) -> Path:
    """The unpacked source release (``folder/src``): from ``sdist``, else the cache, else ``pip download``."""
    source = folder / "src"
    if (source / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return source
    if sdist is None:
        found = sorted(folder.glob(f"llama_cpp_python-{version}.tar.gz"))
        if found:
            sdist = found[0]
        else:
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            subprocess.run([*command, "--dest", str(folder), f"{PACKAGE}=={version}"], check=True)
            sdist = folder / f"llama_cpp_python-{version}.tar.gz"
    with tempfile.TemporaryDirectory(dir=folder) as scratch, tarfile.open(sdist) as archive:
        archive.extractall(scratch, filter="data")
        (top,) = Path(scratch).iterdir()  # llama_cpp_python-<version>/
        top.rename(source)  # atomic: a half-unpacked tree is never taken for a source
    return source


def build(version: str, sdist: Path | None = None, jobs: int | None = None) -> Build:
    """Build the two tools once; later calls return the cached build at once."""
    args = cmake_args()
    folder = build_dir(version, os.environ.get("CMAKE_ARGS", ""))
    if (done := cached(folder)) is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    source = source_release(version, folder, sdist)
    started = time.perf_counter()
    out = folder / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(source), "-B", str(out), *generator, *args], check=True)
    parallel = ["--parallel", str(jobs or os.cpu_count() or 1)]
    subprocess.run(["cmake", "--build", str(out), "--target", *TARGETS, *parallel], check=True)
    binaries = {name: next(out.rglob(f"bin/{name}"), None) for name in TARGETS}
    missing = [name for name, path in binaries.items() if path is None]
    if missing:
        sys.exit(f"{out}: the build finished without {', '.join(missing)}")
    done = Build(
        version=version,
        llama_server=str(binaries["llama-server"]),
        llama_batched_bench=str(binaries["llama-batched-bench"]),
        cmake_args=args,
        build_seconds=round(time.perf_counter() - started, 1),
    )
    partial = folder / f"{INFO}.tmp"
    partial.write_text(json.dumps(asdict(done), indent=2) + "\n")
    partial.replace(folder / INFO)  # the marker appears whole, after both binaries exist
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", help=f"{PACKAGE} release (default: the installed one)")
    parser.add_argument("--sdist", type=Path, help="a downloaded llama_cpp_python-<version>.tar.gz (default: pip)")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all CPUs)")
    parser.add_argument("--json", action="store_true", help="print the build record as JSON")
    args = parser.parse_args(argv)
    done = build(args.version or installed_version(), args.sdist, args.jobs)
    if args.json:
        print(json.dumps(asdict(done), indent=2))
    else:
        print(f"llama-server={done.llama_server}")
        print(f"llama-batched-bench={done.llama_batched_bench}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
