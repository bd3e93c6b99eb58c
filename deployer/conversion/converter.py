"""llama.cpp's own converter, from the pinned llama-cpp-python source release, and one checked conversion.

The engine is llama-cpp-python |version|, which vendors one llama.cpp; its converter
(``convert_hf_to_gguf.py`` with its ``conversion`` package, ``gguf-py`` and the chat templates it
reads) is taken from the same source release, so the GGUF is written by the llama.cpp that loads it.

    LLAMA_CPP_PYTHON_VERSION          the pin: the engine the test suite and the Modal image run
    fetch_converter(folder)           `pip download` the source release once, extract the converter (cached)
    missing_packages()                the converter's Python dependencies that are not installed
    Expected / check_converted(path)  a GGUF's header against the plan: architecture, tensor count, file type
    quantize(source, out, quant)      llama.cpp's quantizer (llama_model_quantize), in a child process
    convert_checkpoint(folder, out, quant, converter, expected)
                                      convert (nothing if ``out`` already holds the planned GGUF), check,
                                      rename into place: ``out`` is whole and checked, or absent

F32, F16, BF16 and Q8_0 the converter writes itself (``--outtype``). Any other type is two steps:
the converter writes a 16-bit intermediate beside ``out`` (``--outtype auto``: BF16 for a bf16
checkpoint, else F16), checked, then llama.cpp's quantizer (the engine's own, through
llama-cpp-python's ``llama_model_quantize``) writes the file; the intermediate is deleted.

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
from deployer.quants import FILE_TYPES, QUANTIZER_QUANTS

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # the engine's version; a test keeps it equal to the installed one
SCRIPT = "convert_hf_to_gguf.py"
# what the converter needs of the vendored llama.cpp: itself, its model classes, its gguf package
# and the chat templates some model classes read
MEMBERS = (SCRIPT, "conversion/", "gguf-py/", "models/templates/")
VENDORED = "vendor/llama.cpp/"
# outtypes the converter writes directly (--outtype), by manifest quant
OUTTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}
# what it writes for the quantizer: the checkpoint's 16-bit type (BF16 for bf16 weights, else F16)
INTERMEDIATE_OUTTYPE = "auto"
INTERMEDIATE_FILE_TYPES = (FILE_TYPES["F16"], FILE_TYPES["BF16"])
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


def _tail(done: subprocess.CompletedProcess[str]) -> str:
    return "\n".join((done.stderr or done.stdout).strip().splitlines()[-OUTPUT_TAIL_LINES:])


def _run_converter(checkpoint: Path, out: Path, outtype: str, converter: Path, python: str) -> None:
    command = [python, str(converter / SCRIPT), str(checkpoint), "--outfile", str(out), "--outtype", outtype]
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}  # its own gguf-py
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise ConversionError(f"llama.cpp's converter failed (exit status {done.returncode}):\n{_tail(done)}")


def quantize(source: Path, out: Path, quant: str, *, python: str = sys.executable) -> None:
    """Quantize the GGUF ``source`` to ``out`` with llama.cpp's quantizer, file type ``quant``.

    Runs in a child process (``python -m deployer.conversion.converter``): llama.cpp logs to stderr, which is
    shown when it fails, and a crash in it is a ConversionError, not the end of this process.
    """
    if quant not in QUANTIZER_QUANTS:
        raise ConversionError(f"llama.cpp's quantizer is used for {', '.join(QUANTIZER_QUANTS)}, not {quant}")
    command = [python, "-m", "deployer.conversion.converter", str(source), str(out), quant]
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding this deployer package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise ConversionError(f"llama.cpp's quantizer failed (exit status {done.returncode}):\n{_tail(done)}")


def _quantize_here(source: str, out: str, quant: str) -> int:
    """llama_model_quantize with llama.cpp's defaults, the file type ``quant`` and every core: 0 on success."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quant]  # llama_ftype's values are general.file_type's
    params.nthread = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return int(llama_cpp.llama_model_quantize(source.encode(), out.encode(), ctypes.byref(params)))


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
    if quant not in OUTTYPES and quant not in QUANTIZER_QUANTS:
        raise ConversionError(f"a conversion writes {', '.join((*OUTTYPES, *QUANTIZER_QUANTS))}, not {quant}")
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
    intermediate = partial.with_suffix(".16bit.gguf")
    version = f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}"
    try:
        if quant in OUTTYPES:
            log(f"converting {checkpoint} to {quant} with llama.cpp's converter ({version})")
            _run_converter(checkpoint, partial, OUTTYPES[quant], converter, python)
        else:
            log(f"converting {checkpoint} to 16 bits with llama.cpp's converter ({version})")
            _run_converter(checkpoint, intermediate, INTERMEDIATE_OUTTYPE, converter, python)
            _check_intermediate(intermediate, expected)
            log(f"quantizing to {quant} with llama.cpp's quantizer ({version})")
            quantize(intermediate, partial, quant, python=python)
        check_converted(partial, expected)
        partial.replace(out)  # atomic: readers see the whole checked file or nothing
    finally:
        partial.unlink(missing_ok=True)
        intermediate.unlink(missing_ok=True)
    log(f"converted: {out.name} ({out.stat().st_size:,} bytes, header checked)")
    return out


def _check_intermediate(path: Path, expected: Expected) -> None:
    """The converter's 16-bit output has the planned architecture and tensors (its type is F16 or BF16)."""
    try:
        header = read_header(path)
    except GgufError as exc:
        raise ConversionError(f"the converter's 16-bit output is not a readable GGUF: {exc}") from exc
    if header.file_type not in INTERMEDIATE_FILE_TYPES:
        raise ConversionError(f"{path.name}: the converter wrote file type {header.file_type}, not F16 or BF16")
    check_converted(path, Expected(expected.arch, expected.tensor_count, header.file_type))


if __name__ == "__main__":  # the quantizer's child process: python -m deployer.conversion.converter SOURCE OUT QUANT
    sys.exit(_quantize_here(*sys.argv[1:4]))
