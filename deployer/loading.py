"""Reading manifest files: bytes → TOML → :class:`Manifest`, with problems people can act on.

Every problem names the file, the line where it can be found, and the key path
(``manifests/qwen.toml:7: server.n_batch: must be at least 1, got 0``). pydantic's errors are
rebuilt from ``e.errors()``; ``str(ValidationError)`` never reaches a user.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from deployer.errors import ManifestInvalid, Problem
from deployer.manifest import APP_NAME_MAX, CHAT_FORMATS, CONVERT_SOURCES, DEFAULT_APP_PREFIX, Manifest, name_max
from deployer.quants import KV_CACHE_TYPES, QUANTS

DEFAULT_MANIFESTS_DIR = "manifests"  # where the commands look when given no path
SCHEMA_COMMENT = "#:schema ../schema/manifest.schema.json"
MAX_MANIFEST_BYTES = 1024 * 1024  # a manifest is a few hundred bytes; anything huge is a mistake


@dataclass(frozen=True)
class LoadedManifest:
    """A valid manifest and where it came from."""

    path: str  # as shown to people: relative to the working directory when possible
    manifest: Manifest
    app_prefix: str = DEFAULT_APP_PREFIX

    @property
    def name(self) -> str:
        return self.manifest.model_name

    @property
    def app_name(self) -> str:
        return app_name(self.app_prefix, self.name)


def app_name(prefix: str, name: str) -> str:
    """The Modal app name of a manifest: ``<prefix>-<name>``."""
    return f"{prefix}-{name}"


def display_path(path: str | Path) -> str:
    """A path as people should see it: relative to the working directory when below it."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


# ## One file


def parse_manifest(data: bytes, path: str, *, app_prefix: str = DEFAULT_APP_PREFIX) -> LoadedManifest:
    """Parse and validate one manifest's bytes; raise :class:`ManifestInvalid` with every problem."""
    text = _decode(data, path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # "Expected ']' at the end of a table declaration (at line 3, column 8)"
        found = re.fullmatch(r"(?s)(.*) \(at line (\d+), column (\d+)\)", str(exc))
        message, line = (f"{found[1]} (column {found[3]})", int(found[2])) if found else (str(exc), None)
        if str(exc).endswith("(at end of document)"):
            message, line = str(exc).replace(" (at end of document)", " at the end of the file"), len(text.splitlines())
        raise ManifestInvalid.single(path, "", f"invalid TOML: {message}", line) from exc
    if not raw:
        raise ManifestInvalid.single(
            path, "", "the manifest is empty; it needs at least repo, file (or convert_from), quant and context"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestInvalid(_problems(exc, raw, text, path)) from exc
    loaded = LoadedManifest(path, manifest, app_prefix)
    _check_app_name(loaded, text)
    _check_slots(loaded, text)
    return loaded


def load_manifest(path: str | Path, *, app_prefix: str = DEFAULT_APP_PREFIX) -> LoadedManifest:
    """Read and validate one manifest file; raise :class:`ManifestInvalid` with every problem."""
    shown = display_path(path)
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_MANIFEST_BYTES + 1)
    except IsADirectoryError as exc:
        raise ManifestInvalid.single(shown, "", "is a directory, not a manifest file") from exc
    except OSError as exc:
        raise ManifestInvalid.single(shown, "", f"cannot read: {exc.strerror or exc}") from exc
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid.single(shown, "", f"is larger than {MAX_MANIFEST_BYTES // 1024} KiB; not a manifest")
    return parse_manifest(data, shown, app_prefix=app_prefix)


def _decode(data: bytes, path: str) -> str:
    if b"\x00" in data:
        raise ManifestInvalid.single(path, "", "is a binary file (it contains NUL bytes), not a TOML manifest")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestInvalid.single(path, "", "is not UTF-8 text; a manifest is a TOML file", line) from exc


def _check_app_name(loaded: LoadedManifest, text: str) -> None:
    longest = name_max(loaded.app_prefix)
    name = loaded.name
    explicit = loaded.manifest.name is not None
    key = "name" if explicit else "file" if loaded.manifest.file else "repo"
    line = locate(text, (key,))
    if not name:
        raise ManifestInvalid.single(loaded.path, "name", f"cannot derive a name from '{key}'; set 'name'", line)
    if len(name) > longest:
        how = "" if explicit else f"the name derived from '{key}' ('{name}') is too long; set 'name': "
        raise ManifestInvalid.single(
            loaded.path,
            "name",
            f"{how}the app name '{loaded.app_name}' would be {len(loaded.app_name)} characters; "
            f"Modal allows {APP_NAME_MAX}, so a name may have at most {longest}",
            line,
        )


def _check_slots(loaded: LoadedManifest, text: str) -> None:
    """A container must hold at least one request per slot: ``[scaling] concurrency >= [server] parallel``."""
    parallel, concurrency = loaded.manifest.server.parallel, loaded.manifest.scaling.concurrency
    if parallel is not None and concurrency is not None and concurrency < parallel:
        raise ManifestInvalid.single(
            loaded.path,
            "scaling.concurrency",
            f"{concurrency} is less than [server] parallel = {parallel}: a container must accept "
            "at least one request per slot",
            locate(text, ("scaling", "concurrency")),
        )


# ## pydantic errors → problems


def _problems(exc: ValidationError, raw: dict[str, Any], text: str, path: str) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = _clean_loc(error["loc"])
        problems.append(Problem(path, locate(text, loc), _key_path(loc), _message(error, loc, raw)))
    return problems


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    # pydantic adds the branch of a union or the validator kind to the location; people never
    # wrote those, so drop them ("function-after[check(), str]", "literal['Q8_0', ...]", ...).
    return tuple(part for part in loc if isinstance(part, int) or not re.search(r"[\[(]", str(part)))


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_TOML_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a float",
    bool: "a boolean",
    list: "an array",
    dict: "a table",
}
_EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "string_type": "a string",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
    "list_type": "an array",
}

# pydantic's bound errors: the words people read, and the key of the bound in the error's ctx
_BOUNDS = {
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
}


def _got(value: Any) -> str:
    kind = next((name for t, name in _TOML_TYPES.items() if type(value) is t), type(value).__name__)
    if isinstance(value, (dict, list)):
        return kind
    shown = repr(value)
    return f"{kind} ({shown[:40] + '…' if len(shown) > 40 else shown})"


def _message(error: dict[str, Any], loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {_got(value)}"
    if kind in _BOUNDS:
        word, bound_key = _BOUNDS[kind]
        bound = ctx.get(bound_key)
        return f"must be {word} {bound:,}, got {value:,}" if isinstance(value, int) else f"must be {word} {bound}"
    if kind in ("literal_error", "enum"):
        return _unknown_choice(loc, value)
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    return error["msg"]


def _unknown_key(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Manifest
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        nested = getattr(field, "annotation", None) if field else None
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            model = nested
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys here: {', '.join(known)}"
    return f"unknown key{hint}"


def _unknown_choice(loc: tuple[Any, ...], value: Any) -> str:
    choices = {
        "quant": QUANTS,
        "kv_cache_type": KV_CACHE_TYPES,
        "chat_format": CHAT_FORMATS,
        "convert_from": CONVERT_SOURCES,
    }.get(str(loc[-1]), ())
    if not isinstance(value, str):
        return f"expected a string, got {_got(value)}"
    close = difflib.get_close_matches(value.upper() if loc[-1] == "quant" else value, choices, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown {loc[-1]} '{value}'{hint} (one of: {', '.join(choices)})"


# ## Where a key is written


_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\- ]+?)\s*\]\s*(#.*)?$")


def locate(text: str, loc: Sequence[Any]) -> int | None:
    """The 1-based line where the key at ``loc`` is written, or its table, or None."""
    keys = [str(part) for part in loc if not isinstance(part, int)]
    if not keys:
        return None
    table, key = ".".join(keys[:-1]), keys[-1]
    current = ""
    table_line = None
    dotted = re.compile(rf"^\s*{re.escape('.'.join(keys))}\s*=")
    plain = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE.match(line)
        if header:
            current = header.group(1).replace(" ", "")
            if current == ".".join(keys):
                return number  # the key is itself a table: point at its header
            if current == table:
                table_line = number
            continue
        if (current == table and plain.match(line)) or (current == "" and dotted.match(line)):
            return number
    return table_line


# ## Many files


def find_manifests(paths: Iterable[str | Path]) -> tuple[list[Path], list[Problem]]:
    """Expand files and folders into manifest files (``*.toml`` below folders), in order."""
    found: list[Path] = []
    problems: list[Problem] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*.toml") if p.is_file()))
        elif path.exists():
            found.append(path)
        else:
            problems.append(Problem(display_path(path), None, "", "no such file or directory"))
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [Path(os.path.relpath(p)) if _below_cwd(p) else p for p in unique], problems


def _below_cwd(path: Path) -> bool:
    try:
        path.relative_to(Path.cwd().resolve())
        return True
    except ValueError:
        return False


def load_manifests(
    paths: Iterable[str | Path], *, app_prefix: str = DEFAULT_APP_PREFIX
) -> tuple[list[LoadedManifest], list[Problem]]:
    """Load every manifest below ``paths``; return the valid ones and every problem found.

    Cross-file rule: two manifests may not produce the same Modal app name.
    """
    files, problems = find_manifests(paths)
    loaded: list[LoadedManifest] = []
    for file in files:
        try:
            loaded.append(load_manifest(file, app_prefix=app_prefix))
        except ManifestInvalid as exc:
            problems.extend(exc.problems)
    by_app: dict[str, list[LoadedManifest]] = {}
    for item in loaded:
        by_app.setdefault(item.app_name, []).append(item)
    clashing = {id(item) for group in by_app.values() if len(group) > 1 for item in group}
    for group in (g for g in by_app.values() if len(g) > 1):
        for item in group:
            others = ", ".join(o.path for o in group if o is not item)
            problems.append(
                Problem(item.path, None, "name", f"app name '{item.app_name}' is also produced by {others}")
            )
    return [item for item in loaded if id(item) not in clashing], sorted(problems)


def load_valid_manifests(paths: Iterable[str | Path], *, app_prefix: str = DEFAULT_APP_PREFIX) -> list[LoadedManifest]:
    """Like :func:`load_manifests`, but raise :class:`ManifestInvalid` if anything is wrong."""
    loaded, problems = load_manifests(paths, app_prefix=app_prefix)
    if problems:
        raise ManifestInvalid(problems)
    return loaded
