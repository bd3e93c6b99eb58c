"""The GPU catalogue and the selection table, loaded from the package data file ``gpus.toml``.

Pure data: names Modal accepts, memory, price, per-container limits and the rows that map a
model (parameter count, quantized or not) to a GPU type. Planning reads it; nothing writes it.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MIB = 1024 * 1024


class _Data(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuType(_Data):
    """One Modal GPU type."""

    name: str
    aliases: tuple[str, ...] = ()
    memory_mib: Annotated[int, Field(gt=0)]
    usd_per_hour: Annotated[float, Field(gt=0)]
    max_count: Annotated[int, Field(ge=1)]
    usable_fraction: Annotated[float, Field(gt=0, le=1)]

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    @property
    def usable_bytes(self) -> int:
        """What a plan may fill on one GPU of this type."""
        return int(self.memory_bytes * self.usable_fraction)


class SelectionRow(_Data):
    """One row of the selection table: a parameter range and weight kind → a GPU type."""

    label: str
    min_params: int = 0
    max_params: int | None = None
    weights: Literal["quantized", "unquantized", "any"]
    gpu: str
    fallbacks: tuple[str, ...] = ()

    def matches(self, params: int, quantized: bool) -> bool:
        if params < self.min_params or (self.max_params is not None and params >= self.max_params):
            return False
        return self.weights == "any" or (self.weights == "quantized") == quantized


class Catalogue(_Data):
    """Every GPU type, the escalation ladder and the selection table."""

    prices_source: str
    prices_date: str
    gpus: dict[str, GpuType]
    escalation: tuple[str, ...]
    multi_gpu_counts: tuple[int, ...]
    selection: tuple[SelectionRow, ...]

    @model_validator(mode="before")
    @classmethod
    def _name_the_gpus(cls, data: dict) -> dict:
        gpus = data.get("gpus", {})
        data["gpus"] = {name: {"name": name, **spec} for name, spec in gpus.items()}
        return data

    @model_validator(mode="after")
    def _references_exist(self) -> Catalogue:
        named = [*self.escalation] + [n for row in self.selection for n in (row.gpu, *row.fallbacks)]
        unknown = sorted({n for n in named if n not in self.gpus})
        if unknown:
            raise ValueError(f"unknown GPU types referenced: {', '.join(unknown)}")
        return self

    def canonical(self, name: str) -> str | None:
        """Modal's canonical spelling of a GPU type (case-insensitive, aliases resolved)."""
        wanted = name.upper()
        for gpu in self.gpus.values():
            if wanted == gpu.name.upper() or wanted in (a.upper() for a in gpu.aliases):
                return gpu.name
        return None

    def spellings(self) -> list[str]:
        """Every spelling Modal accepts, canonical names first."""
        return [*self.gpus] + [a for g in self.gpus.values() for a in g.aliases]

    def row_for(self, params: int, quantized: bool) -> SelectionRow:
        """The one selection row a model lands on."""
        rows = [row for row in self.selection if row.matches(params, quantized)]
        if len(rows) != 1:  # guarded by a test over the whole domain; kept as a loud failure
            raise AssertionError(f"selection table: {len(rows)} rows match {params} params, quantized={quantized}")
        return rows[0]


@cache
def load_catalogue() -> Catalogue:
    """The catalogue shipped with the package (``deployer/gpus.toml``)."""
    text = resources.files("deployer").joinpath("gpus.toml").read_text(encoding="utf-8")
    return Catalogue.model_validate(tomllib.loads(text))
