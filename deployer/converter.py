"""llama.cpp's own converter, from the pinned llama-cpp-python source release, and one checked conversion.

The engine is llama-cpp-python |version|, which vendors one llama.cpp; its converter
(``convert_hf_to_gguf.py`` with its ``conversion`` package, ``gguf-py`` and the chat templates it
reads) is taken from the same source release, so the GGUF is written by the llama.cpp that loads it.

    LLAMA_CPP_PYTHON_VERSION          the pin: the engine the test suite and the Modal image run
    fetch_converter(folder)           `pip download` the source release once, extract the converter (cached)
    missing_packages()                the converter's Python dependencies that are not installed
    Expected / check_converted(path)  a GGUF's header against the plan: architecture, tensor count, file type
    convert_checkpoint(folder, out, quant, converter, expected)
                                      convert (nothing if ``out`` already holds the planned GGUF), check,
                                      rename into place: ``out`` is whole and checked, or absent

The same code converts on Modal (the conversion function of the rendered app) and locally
(``gguf-deploy serve``); only where the converter and the checkpoint lie differs.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deployer.errors import ConversionError, GgufError
from deployer.gguf_header import read_header

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the engine's version; a test keeps it equal to the installed one
SCRIPT = "convert_hf_to_gguf.py"
# what the converter needs of the vendored llama.cpp: itself, its model classes, its gguf package
# and the chat templates some model classes read
MEMBERS = (SCRIPT, "conversion/", "gguf-py/", "models/templates/")
VENDORED = "vendor/llama.cpp/"
# outtypes the converter writes directly (--outtype), by manifest quant
OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
# the converter's imports that are not the standard library (requirements-convert_hf_to_gguf.txt)
REQUIRED_PACKAGES = ("torch", "numpy", "sentencepiece", "transformers", "safetensors", "yaml", "tqdm", "requests")
CONVERT_EXTRA = "gguf-deploy[convert]"
OUTPUT_TAIL_LINES = 20  # of the converter's output, shown when it fails

Log = Callable[[str], None]


def default_converter_dir(cache_dir: Path) -> Path:
    """Where the converter of the pinned release is kept in a cache folder."""
    return cache_dir / "converter" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def fetch_converter(
    folder: Path, *, version: str = LLAMA_CPP_PYTHON_VERSION, pip: Sequence[str] = (sys.executable, "-m", "pip")
) -> Path:
    """The converter extracted into ``folder`` from llama-cpp-python ``version``'s source release.

    Downloaded with pip (its index, proxies and cache) the first time; ``folder`` appears whole or
    not at all, so a later call (or a racing one) finds it complete.
    """
    if (folder / SCRIPT).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as scratch:
        download = Path(scratch) / "download"
        command = [*pip, "download", "--no-deps", "--no-binary", ":all:", "--dest", str(download)]
        done = subprocess.run([*command, f"llama-cpp-python=={version}"], capture_output=True, text=True, check=False)
        archives = sorted(download.glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no archive"]
            raise ConversionError(
                f"cannot download llama-cpp-python {version}'s source release (for llama.cpp's converter): {last[0]}"
            )
        staging = Path(scratch) / "converter"
        _extract(archives[0], staging)
        if not (staging / SCRIPT).is_file():
            raise ConversionError(f"{archives[0].name} holds no {VENDORED}{SCRIPT}")
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / SCRIPT).is_file():  # not a racing fetch that won: a real failure
                raise
    return folder


def _extract(archive: Path, target: Path) -> None:
    """The converter's members of the vendored llama.cpp, and nothing else, below ``target``."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            rest = member.name.partition("/")[2]
            if not rest.startswith(VENDORED):
                continue
            inside = rest.removeprefix(VENDORED)
            if inside.startswith(MEMBERS) and "/tests/" not in f"/{inside}":
                member.name = inside
                tar.extract(member, target, filter="data")  # no links out, no absolute paths


def missing_packages() -> list[str]:
    """The converter's dependencies that cannot be imported here."""
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def require_packages() -> None:
    """ConversionError naming the extra to install when the converter cannot run here."""
    missing = missing_packages()
    if missing:
        raise ConversionError(
            f"converting Transformers weights needs {', '.join(missing)}: pip install '{CONVERT_EXTRA}'"
        )


@dataclass(frozen=True)
class Expected:
    """What the plan predicted of the converted file's header."""

    arch: str
    tensor_count: int
    file_type: int


def check_converted(path: Path, expected: Expected) -> None:
    """ConversionError unless ``path``'s header has the planned architecture, tensor count and file type."""
    try:
        header = read_header(path)
    except GgufError as exc:
        raise ConversionError(f"the converted file is not a readable GGUF: {exc}") from exc
    found = Expected(header.arch, len(header.tensors), header.file_type if header.file_type is not None else -1)
    if found != expected:
        raise ConversionError(
            f"{path.name}: the converter wrote {found.arch}, {found.tensor_count} tensors, file type "
            f"{found.file_type}; the plan expects {expected.arch}, {expected.tensor_count} tensors, "
            f"file type {expected.file_type}"
        )


def convert_checkpoint(
    checkpoint: Path,
    out: Path,
    quant: str,
    *,
    converter: Path,
    expected: Expected,
    python: str = sys.executable,
    log: Log = print,
) -> Path:
    """Convert the Transformers checkpoint in ``checkpoint`` to ``out`` (type ``quant``), checked.

    Nothing is converted when ``out`` already holds a GGUF with the planned header. The converter
    writes a temporary file beside ``out``; only a checked file is renamed to ``out``.
    """
    if quant not in OUTTYPES:
        raise ConversionError(f"llama.cpp's converter writes {', '.join(OUTTYPES)}, not {quant}")
    if out.is_file():
        try:
            check_converted(out, expected)
        except ConversionError as exc:
            log(f"converting again: {exc}")
        else:
            log(f"cached: {out.name}")
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".partial-{uuid.uuid4().hex}.gguf"
    command = [python, str(converter / SCRIPT), str(checkpoint), "--outfile", str(partial)]
    command += ["--outtype", OUTTYPES[quant]]
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}  # its own gguf-py
    log(f"converting {checkpoint} to {quant} with llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})")
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-OUTPUT_TAIL_LINES:])
            raise ConversionError(f"llama.cpp's converter failed (exit status {done.returncode}):\n{tail}")
        check_converted(partial, expected)
        partial.replace(out)  # atomic: readers see the whole checked file or nothing
    finally:
        partial.unlink(missing_ok=True)
    log(f"converted: {out.name} ({out.stat().st_size:,} bytes, header checked)")
    return out
