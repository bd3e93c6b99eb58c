"""Resolving a conversion: a checkpoint repo at a commit, read on the hub → the facts of the GGUF its conversion writes.

Only small things are read, through :class:`deployer.hub.HubClient`: ``config.json``,
``tokenizer_config.json`` and, for SafeTensors, each file's JSON header by range requests
(huggingface_hub's ``parse_safetensors_file_metadata``). A ``.bin`` checkpoint's pickled header
cannot be read that way: its tensors follow from ``config.json`` and are checked against the file
sizes of the Hub's listing. The prediction itself is :func:`deployer.conversion.checkpoint.predict`.

    converted_file(repo, source, quant)   where the converted GGUF lives below the commit's folder
    conversion_of(file)                   (source, quant) of such a path, else None
    checkpoint_files(files, source)       the files the converter reads, or HubError saying what the repo holds
    fetch_conversion(client, snapshot, revision, source, quant) -> ModelFacts
    CONVERSIONS                           converted_file and fetch_conversion as :class:`deployer.hub.Conversions`,
                                          which a :class:`~deployer.hub.Resolver` is given to resolve ``convert_from``
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from deployer.conversion.checkpoint import SourceTensor, layout_of, predict, source_bytes, tensors_from_config
from deployer.errors import HubError, PlanError
from deployer.facts import Conversion, ModelFacts, ShardFacts
from deployer.hub import Conversions, HubClient, Progress, RepoSnapshot

CONVERTED_DIR = "gguf-deploy"  # below the commit's folder; no Hugging Face repo is expected to use it
_CONVERTED = re.compile(rf"^{CONVERTED_DIR}/(safetensors|pytorch)-([A-Z0-9_]+)/[^/]+\.gguf$")
# weight files the converter reads, per source format (top-level files only: it reads the folder)
WEIGHTS = {
    "safetensors": re.compile(r"^[^/]+\.safetensors$"),
    "pytorch": re.compile(r"^pytorch_model[^/]*\.bin$"),
}
INDEXES = {"safetensors": "model.safetensors.index.json", "pytorch": "pytorch_model.bin.index.json"}
# what the converter reads besides the weights, when the repo has it
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja")
MAX_CONFIG_BYTES = 4 * 1024 * 1024  # config.json and tokenizer_config.json are KBs
BIN_SIZE_TOLERANCE = 0.05  # pickling adds a little; a larger gap means config.json does not describe the files


def converted_file(repo: str, source: str, quant: str) -> str:
    """The converted GGUF's path below the commit's folder: ``gguf-deploy/safetensors-Q8_0/<name>-Q8_0.gguf``."""
    return f"{CONVERTED_DIR}/{source}-{quant}/{repo.rsplit('/', 1)[-1]}-{quant}.gguf"


def conversion_of(file: str) -> tuple[str, str] | None:
    """``(source, quant)`` when ``file`` is a path :func:`converted_file` made, else None."""
    found = _CONVERTED.match(file)
    return (found[1], found[2]) if found else None


def checkpoint_files(repo: str, files: Iterable[str], source: str) -> tuple[list[str], list[str]]:
    """(weight files, side files) of ``source`` weights in the listing; HubError saying what the repo holds otherwise."""
    listed = sorted(files)
    weights = [f for f in listed if WEIGHTS[source].match(f)]
    if not weights:
        other = next(s for s in WEIGHTS if s != source)
        if any(WEIGHTS[other].match(f) for f in listed):
            raise HubError(f"{repo}: holds no {source} weights but {other} ones: set convert_from = '{other}'")
        ggufs = [f for f in listed if f.endswith(".gguf")]
        if ggufs:
            raise HubError(f"{repo}: holds GGUF files, not {source} weights: set file (e.g. '{ggufs[0]}') instead")
        raise HubError(
            f"{repo}: holds neither a GGUF file nor Transformers weights (*.safetensors, pytorch_model*.bin); "
            "nothing to deploy"
        )
    if "config.json" not in listed:
        raise HubError(f"{repo}: has {source} weights but no config.json; llama.cpp's converter needs it")
    side = [f for f in (*SIDE_FILES, INDEXES[source]) if f in listed]
    return weights, side


def fetch_conversion(
    client: HubClient,
    snapshot: RepoSnapshot,
    revision: str,
    source: str,
    quant: str,
    *,
    progress: Callable[[str], None] = lambda message: None,
) -> ModelFacts:
    """The facts of the GGUF that converting ``snapshot``'s ``source`` weights to ``quant`` writes."""
    repo = snapshot.repo
    weights, side = checkpoint_files(repo, snapshot.files, source)
    progress(f"reading {repo}/config.json")
    config = _json(client, snapshot, "config.json")
    layout = layout_of(config, repo)
    tokenizer_config = _json(client, snapshot, "tokenizer_config.json") if "tokenizer_config.json" in side else {}
    if source == "safetensors":
        tensors = []
        for number, file in enumerate(weights, start=1):
            progress(f"reading the SafeTensors header of {file} ({number} of {len(weights)})")
            header = client.safetensors_header(repo, snapshot.commit, file)
            tensors += [SourceTensor(name, shape, dtype) for name, (dtype, shape) in header.items()]
    else:
        tensors = tensors_from_config(config, layout, repo)
        _check_bin_sizes(repo, tensors, sum(snapshot.files[f].size for f in weights))
    predicted = predict(
        config,
        tensors,
        quant,
        repo=repo,
        tokenizer_bytes=sum(snapshot.files[f].size for f in TOKENIZER_FILES if f in snapshot.files),
        has_chat_template="chat_template" in tokenizer_config or "chat_template.jinja" in snapshot.files,
    )
    files = tuple(ShardFacts(f, snapshot.files[f].size, snapshot.files[f].sha256) for f in (*side, *weights))
    gguf = ShardFacts(converted_file(repo, source, quant), predicted.size, None)
    conversion = Conversion(source, quant, files, str(config["architectures"][0]))
    return ModelFacts(repo, revision, snapshot.commit, (gguf,), predicted.header, conversion)


class _CheckpointConversions:
    """:class:`deployer.hub.Conversions` for Transformers checkpoints: the paths of :func:`converted_file`."""

    def converted_file(self, repo: str, source: str, quant: str) -> str:
        return converted_file(repo, source, quant)

    def fetch(
        self, client: HubClient, snapshot: RepoSnapshot, revision: str, file: str, progress: Progress
    ) -> ModelFacts | None:
        wanted = conversion_of(file)
        if wanted is None:  # a file the repo holds
            return None
        return fetch_conversion(client, snapshot, revision, *wanted, progress=progress)


CONVERSIONS: Conversions = _CheckpointConversions()


def _json(client: HubClient, snapshot: RepoSnapshot, file: str) -> Mapping[str, Any]:
    size = snapshot.files[file].size
    if size > MAX_CONFIG_BYTES:
        raise HubError(f"{snapshot.repo}/{file}: {size:,} bytes; a config file is far smaller")
    data = client.read_range(snapshot.repo, snapshot.commit, file, 0, size) if size else b""
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise HubError(f"{snapshot.repo}/{file}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise HubError(f"{snapshot.repo}/{file}: not a JSON object")
    return value


def _check_bin_sizes(repo: str, tensors: list[SourceTensor], listed: int) -> None:
    expected = source_bytes(tensors)
    if abs(listed - expected) > BIN_SIZE_TOLERANCE * expected:
        raise PlanError(
            f"{repo}: the .bin files hold {listed:,} bytes, but config.json describes {expected:,} bytes of weights; "
            "the conversion cannot be predicted"
        )
