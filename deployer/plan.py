"""The plan: a pure function of a manifest, model facts and the GPU catalogue.

Its types (:class:`Plan`, :class:`GpuChoice`, :class:`PlanFailure`) are what rendering,
deploying and the CLI read. How a GPU is chosen (:func:`plan`), the catalogue and the table
being data in ``gpus.toml``:

1. the manifest must agree with the file: its ``quant`` with ``general.file_type``, its
   ``context`` within the trained context (:func:`check_facts`);
2. a ``gpu`` override is used as given, but every type in it must hold the estimate;
3. otherwise the selection table's row (parameters, quantized or not) names a type; the memory
   estimate must fit its usable memory × count. If it does not, escalate up the ladder
   (L4 → A10 → L40S → A100-80GB → H100 → H200 → B200), then to 2, 4, 8 GPUs of the cheapest
   type that holds it; ``policy="cheapest"`` takes the cheapest GPU set that fits instead;
4. Modal fallbacks, up to three that also hold it: the table row's own first, then other types
   of the same or more memory, cheapest first (an override's list is its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from deployer.catalogue import Catalogue, GpuType, load_catalogue
from deployer.errors import GgufDeployError, PlanError
from deployer.estimate import GIB, EstimateSettings, MemoryEstimate, estimate
from deployer.facts import GgufHeader, ModelFacts
from deployer.loading import LoadedManifest
from deployer.manifest import Manifest
from deployer.quants import is_quantized

Policy = Literal["table", "cheapest"]
POLICIES: tuple[Policy, ...] = ("table", "cheapest")
MAX_FALLBACKS = 3  # enough to ride out one scarce type without drifting into far costlier ones
# nvidia-smi totals of GPUs sold as the same size differ by a few MiB (L4 23034, A10 23028):
# a fallback "of the same memory" may have this much less
SAME_MEMORY = 0.99

Estimator = Callable[[GgufHeader, EstimateSettings], MemoryEstimate]  # estimate(), or a test's own


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


@dataclass(frozen=True)
class PlanFailure:
    """A manifest that could not be loaded or planned, and why (the message starts with its path)."""

    path: str
    name: str  # the manifest's name, or its file stem when it did not load
    error: str


# ## Checks and settings


def check_facts(loaded: LoadedManifest, facts: ModelFacts) -> None:
    """The manifest must agree with the file: ``quant`` and ``context``. Raises PlanError."""
    manifest, header = loaded.manifest, facts.header
    if header.file_type is not None and manifest.quant != header.quant:
        found = header.quant or "a type gguf-deploy does not know"
        raise PlanError(
            f"{loaded.path}: quant: '{manifest.quant}' does not match the file, "
            f"whose general.file_type is {header.file_type} ({found})"
        )
    if manifest.context > header.context_length:
        raise PlanError(
            f"{loaded.path}: context: {manifest.context} exceeds the model's trained context {header.context_length}"
        )


def estimate_settings(manifest: Manifest, n_gpus: int = 1) -> EstimateSettings:
    """What the estimator needs from a manifest's ``[server]`` table, for ``n_gpus`` GPUs."""
    server = manifest.server
    return EstimateSettings(
        context=manifest.context,
        n_batch=server.n_batch,
        n_ubatch=server.n_ubatch,
        flash_attn=server.flash_attn,
        kv_cache_type=server.kv_cache_type,
        n_gpus=n_gpus,
        embeddings=server.embeddings,
    )


def gib(n_bytes: int | float) -> str:
    """``21.4 GiB``: how plans show memory."""
    return f"{n_bytes / GIB:,.1f} GiB"


def params_label(params: int) -> str:
    """``18.4B``, ``494M``: how plans show parameter counts."""
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"


def breakdown(est: MemoryEstimate) -> str:
    """``weights 18.2 GiB + KV 3.0 GiB + compute 0.3 GiB + overhead 0.5 GiB``, over all GPUs."""
    return f"weights {gib(est.weights)} + KV {gib(est.kv)} + compute {gib(est.compute)} + overhead {gib(est.overhead)}"


# ## Planning


class _Sizer:
    """The estimate for each GPU count (weights split over GPUs), each computed once."""

    def __init__(self, loaded: LoadedManifest, facts: ModelFacts, catalogue: Catalogue, estimator: Estimator) -> None:
        self.loaded, self.facts, self.catalogue, self.estimator = loaded, facts, catalogue, estimator
        self._by_count: dict[int, MemoryEstimate] = {}

    def estimate(self, count: int) -> MemoryEstimate:
        if count not in self._by_count:
            settings = estimate_settings(self.loaded.manifest, count)
            self._by_count[count] = self.estimator(self.facts.header, settings)
        return self._by_count[count]

    def fits(self, gpu_type: str, count: int) -> bool:
        gpu = self.catalogue.gpus[gpu_type]
        return count <= gpu.max_count and self.estimate(count).per_gpu <= gpu.usable_bytes

    def choice(self, gpu_type: str, count: int) -> GpuChoice:
        gpu = self.catalogue.gpus[gpu_type]
        return GpuChoice(gpu_type, count, round(gpu.usd_per_hour * count, 2), gpu.usable_bytes)

    def too_small(self, gpu_type: str, count: int) -> str:
        """``L4 holds 15.7 GiB (70 % of 22.5 GiB); the model needs 21.4 GiB per GPU (…)``."""
        gpu, est = self.catalogue.gpus[gpu_type], self.estimate(count)
        spelled = gpu_type if count == 1 else f"{count}× {gpu_type}"
        return (
            f"{spelled} offers {gib(gpu.usable_bytes)} usable per GPU ({gpu.usable_fraction:.0%} of "
            f"{gib(gpu.memory_bytes)}) but the model needs {gib(est.per_gpu)} per GPU ({breakdown(est)})"
        )

    def fits_nowhere(self, gpu_types: Iterable[str]) -> PlanError:
        """The error when none of ``gpu_types`` holds the model: the numbers of the largest set of them."""
        largest = max((self.catalogue.gpus[t] for t in gpu_types), key=lambda g: g.usable_bytes * g.max_count)
        return PlanError(
            f"{self.loaded.path}: the model fits on no GPU set: {self.too_small(largest.name, largest.max_count)}"
        )


def plan(
    loaded: LoadedManifest,
    facts: ModelFacts,
    catalogue: Catalogue | None = None,
    policy: Policy = "table",
    *,
    estimator: Estimator = estimate,
) -> Plan:
    """Choose the GPU for one manifest; raises :class:`PlanError` with the numbers when nothing fits."""
    catalogue = catalogue or load_catalogue()
    check_facts(loaded, facts)
    sizer = _Sizer(loaded, facts, catalogue, estimator)
    cheapest = _cheapest(sizer)
    row_fallbacks: tuple[str, ...] = ()
    fallbacks: tuple[GpuChoice, ...] | None = None
    if loaded.manifest.gpus:
        chosen, fallbacks, reason = _override(loaded, sizer)
    elif cheapest is None:
        raise sizer.fits_nowhere(catalogue.gpus)
    elif policy == "cheapest":
        chosen, reason = cheapest, "policy 'cheapest': the cheapest GPU set that holds the estimate"
    else:
        chosen, reason, row_fallbacks = _from_table(sizer)
    if fallbacks is None:  # an override's list is used as given
        fallbacks = _fallbacks(sizer, chosen, row_fallbacks)
    return Plan(
        manifest=loaded,
        facts=facts,
        estimate=sizer.estimate(chosen.count),
        gpu=chosen,
        fallbacks=fallbacks,
        reason=reason,
        cheapest=cheapest or chosen,
        policy=policy,
    )


def _override(loaded: LoadedManifest, sizer: _Sizer) -> tuple[GpuChoice, tuple[GpuChoice, ...], str]:
    specs = loaded.manifest.gpus
    for spec in specs:
        if not sizer.fits(spec.type, spec.count):
            single = next((t for t in sizer.catalogue.escalation if sizer.fits(t, 1)), None)
            hint = f"; the smallest single GPU that holds it is {single}" if single else ""
            raise PlanError(f"{loaded.path}: gpu: {sizer.too_small(spec.type, spec.count)}{hint}")
    chosen = [sizer.choice(spec.type, spec.count) for spec in specs]
    listed = ", ".join(str(spec) for spec in specs)
    return chosen[0], tuple(chosen[1:]), f"override: gpu = {listed} in the manifest (checked: it holds the estimate)"


def _from_table(sizer: _Sizer) -> tuple[GpuChoice, str, tuple[str, ...]]:
    catalogue, header = sizer.catalogue, sizer.facts.header
    quant = header.quant or sizer.loaded.manifest.quant
    params = header.params
    row = catalogue.row_for(params, is_quantized(quant))
    label = f"table row '{row.label}' ({params_label(params)} parameters, {quant})"
    if sizer.fits(row.gpu, 1):
        return sizer.choice(row.gpu, 1), label, row.fallbacks
    ladder = catalogue.escalation
    above = ladder[ladder.index(row.gpu) + 1 :] if row.gpu in ladder else ladder
    need = gib(sizer.estimate(1).per_gpu)
    for gpu_type in above:
        if sizer.fits(gpu_type, 1):
            why = f"escalated: {label} gives {row.gpu}, which cannot hold {need}; {gpu_type} is the next that can"
            return sizer.choice(gpu_type, 1), why, ()
    for count in catalogue.multi_gpu_counts:
        fitting = [sizer.choice(t, count) for t in ladder if sizer.fits(t, count)]
        if fitting:
            best = min(fitting, key=lambda c: c.usd_per_hour)
            why = (
                f"escalated: {label} gives {row.gpu}; no single GPU holds {need}, and {count}× {best.type} "
                f"is the cheapest set of {count} that holds {gib(sizer.estimate(count).per_gpu)} per GPU"
            )
            return best, why, ()
    raise sizer.fits_nowhere(ladder)  # only a GPU off the ladder holds it


def _cheapest(sizer: _Sizer) -> GpuChoice | None:
    """The cheapest (type, count) of the whole catalogue that holds the estimate; fewer GPUs on a tie."""
    catalogue = sizer.catalogue
    counts = (1, *catalogue.multi_gpu_counts)
    fitting = [sizer.choice(t, n) for n in counts for t in catalogue.gpus if sizer.fits(t, n)]
    return min(fitting, key=lambda c: (c.usd_per_hour, c.count, -c.usable_bytes), default=None)


def _fallbacks(sizer: _Sizer, chosen: GpuChoice, preferred: tuple[str, ...]) -> tuple[GpuChoice, ...]:
    """Types that also hold the estimate: the row's own first, then others of the same or more memory by price."""
    gpus: dict[str, GpuType] = sizer.catalogue.gpus
    floor = gpus[chosen.type].memory_mib * SAME_MEMORY
    by_price = sorted(gpus, key=lambda t: (gpus[t].usd_per_hour, t))
    found: list[GpuChoice] = []
    for gpu_type in dict.fromkeys((*preferred, *by_price)):
        # the row's own fallbacks are the table's word ("B200 (fallback H200)"): no memory floor
        big_enough = gpu_type in preferred or gpus[gpu_type].memory_mib >= floor
        if gpu_type != chosen.type and big_enough and sizer.fits(gpu_type, chosen.count):
            found.append(sizer.choice(gpu_type, chosen.count))
    return tuple(found[:MAX_FALLBACKS])


# ## Many manifests


def plan_all(
    manifests: Iterable[LoadedManifest],
    resolve: Callable[[LoadedManifest], ModelFacts],
    *,
    catalogue: Catalogue | None = None,
    policy: Policy = "table",
    estimator: Estimator = estimate,
) -> list[Plan | PlanFailure]:
    """Resolve and plan every manifest; one that fails becomes a :class:`PlanFailure`, the rest go on."""
    catalogue = catalogue or load_catalogue()
    results: list[Plan | PlanFailure] = []
    for loaded in manifests:
        try:
            results.append(plan(loaded, resolve(loaded), catalogue, policy, estimator=estimator))
        except GgufDeployError as exc:
            message = str(exc)
            if not message.startswith(f"{loaded.path}:"):
                message = f"{loaded.path}: {message}"
            results.append(PlanFailure(loaded.path, loaded.name, message))
    return results
