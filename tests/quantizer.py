"""llama.cpp's quantizer as an oracle for the predicted mixes, at real model widths, without weights.

``sparse_gguf(path, header)`` writes a 16-bit GGUF of a predicted header whose data is a hole in a
sparse file (a Llama-3-8B takes a few kilobytes of disk); ``dry_run(path, quants)`` asks llama.cpp's
own quantizer (``llama_model_quantize`` with ``dry_run``, in a child process) which type it would
give each tensor for each file type, and whether it would need an importance matrix. Nothing is
read of the data in a dry run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType

from deployer.facts import GgufHeader
from deployer.quants import FILE_TYPES

ALIGNMENT = 32
# what the quantizer logs per tensor: "[  9/291] blk.0.ffn_down.weight - [...], type = f16, size = ... (q6_K)"
# (no "(type)" at the end when the tensor is copied as it is)
TENSOR_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[.*?\], type =\s+(\w+), size =[^(\n]*(?:\((\w+)\))?$", re.M)
NEEDS_IMATRIX = "will require an imatrix"
SEPARATOR = "=== quant "

CHILD = """
import ctypes, sys
import llama_cpp
for quant, ftype in zip(sys.argv[2::2], sys.argv[3::2]):
    print("=== quant " + quant, file=sys.stderr, flush=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.dry_run, params.nthread = int(ftype), True, 1
    if llama_cpp.llama_model_quantize(sys.argv[1].encode(), b"unused.gguf", ctypes.byref(params)) != 0:
        sys.exit(f"dry run of {quant} failed")
"""


def sparse_gguf(path: Path, header: GgufHeader) -> Path:
    """A GGUF with ``header``'s architecture fields and tensors (F16/BF16/F32), its data a hole."""
    writer = gguf.GGUFWriter(str(path), header.arch)
    writer.add_block_count(header.block_count)
    writer.add_context_length(header.context_length)
    writer.add_embedding_length(header.embedding_length)
    ffn = next(t.shape[1] for t in header.tensors if t.name.endswith("ffn_up.weight"))
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(header.head_count[0])
    writer.add_head_count_kv(header.head_count_kv[0])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(header.key_length or 0)
    writer.add_vocab_size(header.vocab_size or 0)
    writer.add_file_type(header.file_type or 0)
    numpy_types = {GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32}
    for t in header.tensors:
        ggml_type = GGMLQuantizationType(t.ggml_type)
        writer.add_tensor_info(
            t.name, tuple(reversed(t.shape)), numpy_types.get(ggml_type, np.uint8), t.n_bytes, raw_dtype=ggml_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    data = -(-path.stat().st_size // ALIGNMENT) * ALIGNMENT
    os.truncate(path, data + sum(-(-t.n_bytes // ALIGNMENT) * ALIGNMENT for t in header.tensors))
    return path


@dataclass(frozen=True)
class DryRun:
    """What llama.cpp's quantizer would write for one file type."""

    types: dict[str, GGMLQuantizationType]
    needs_imatrix: bool


def dry_run(path: Path, quants: list[str]) -> dict[str, DryRun]:
    """llama.cpp's quantizer's choices for each of ``quants`` on the GGUF at ``path``."""
    args = [item for quant in quants for item in (quant, str(FILE_TYPES[quant]))]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), *args], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results: dict[str, DryRun] = {}
    for part in done.stderr.split(SEPARATOR)[1:]:
        quant, _, log = part.partition("\n")
        types = {name: GGMLQuantizationType[(new or old).upper()] for name, old, new in TENSOR_LINE.findall(log)}
        results[quant] = DryRun(types, NEEDS_IMATRIX in log)
    assert list(results) == quants, done.stderr[-3000:]
    return results
