"""The plan: a pure function of a manifest, model facts and the GPU catalogue.

CONTRACT FIRST — these types are what rendering, deploying and the CLI read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from deployer.estimate import MemoryEstimate
from deployer.facts import ModelFacts
from deployer.loading import LoadedManifest

Policy = Literal["table", "cheapest"]


@dataclass(frozen=True)
class GpuChoice:
    """A GPU type and count, with what it costs and holds."""

    type: str  # canonical Modal name ("H100")
    count: int
    usd_per_hour: float  # count × price per GPU
    usable_bytes: int  # per GPU: memory × usable fraction

    @property
    def modal(self) -> str:
        """Modal's ``gpu=`` spelling: ``H100`` or ``H100:2``."""
        return self.type if self.count == 1 else f"{self.type}:{self.count}"


@dataclass(frozen=True)
class Plan:
    """Everything deploying a manifest needs, decided."""

    manifest: LoadedManifest
    facts: ModelFacts
    estimate: MemoryEstimate
    gpu: GpuChoice  # the choice
    fallbacks: tuple[GpuChoice, ...]  # Modal tries these, in order, when the choice is scarce
    reason: str  # why: the table row, the escalation, or the override
    cheapest: GpuChoice  # the cheapest GPU set that fits (may equal the choice)
    policy: Policy = "table"

    @property
    def headroom_bytes(self) -> int:
        """Usable memory left on the fullest GPU."""
        return self.gpu.usable_bytes - self.estimate.per_gpu

    @property
    def modal_gpus(self) -> list[str]:
        """The ``gpu=`` argument of the Modal function: the choice, then the fallbacks."""
        return [self.gpu.modal, *(f.modal for f in self.fallbacks)]
