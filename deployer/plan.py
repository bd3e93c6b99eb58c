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
4. slots (:class:`Slots`): a manifest's ``[server] parallel`` is sized from the start (the GPU
   must hold that many full-context KV streams); without one the GPU is chosen for one slot, then
   given as many slots as fit its usable memory beside weights, compute and overhead, at most
   :data:`MAX_AUTO_SLOTS` (and at most ``[scaling] concurrency``); an override's every GPU set must
   hold them. A container holds ``[scaling] concurrency`` requests, by default twice the slots;
5. Modal fallbacks, up to three that also hold the plan's estimate (its slots included): the table
   row's own first, then other types of the same or more memory, cheapest first (an override's list
   is its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from deployer.catalogue import Catalogue, GpuType, load_catalogue
from deployer.errors import GgufDeployError, PlanError
from deployer.estimate import GIB, EstimateSettings, MemoryEstimate, estimate
from deployer.facts import GgufHeader, ModelFacts
from deployer.loading import LoadedManifest
from deployer.manifest import Manifest
from deployer.projector import add_projector
from deployer.quants import is_quantized
from deployer.runtime.config import default_concurrency

Policy = Literal["table", "cheapest"]
POLICIES: tuple[Policy, ...] = ("table", "cheapest")
MAX_FALLBACKS = 3  # enough to ride out one scarce type without drifting into far costlier ones
# nvidia-smi totals of GPUs sold as the same size differ by a few MiB (L4 23034, A10 23028):
# a fallback "of the same memory" may have this much less
SAME_MEMORY = 0.99
# Slots the planner gives a manifest without [server] parallel, at most: batching 8 sequences
# multiplies throughput several times on a GPU, while each slot costs a full context of KV cache
MAX_AUTO_SLOTS = 8

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
class Slots:
    """How many requests one container serves at once."""

    parallel: int  # decoded together in one batch, each with a full context of KV cache (Modal's target_inputs)
    concurrency: int  # held at once: `parallel` decoding, the rest queued; beyond it 429 (Modal's max_inputs)
    reason: str  # why that many slots

    @property
    def queued(self) -> int:
        """Requests that may wait for a slot in one container."""
        return self.concurrency - self.parallel


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
    slots: Slots  # requests decoded together and held per container; the estimate counts their KV cache
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
    projector = facts.projector
    if projector is not None and projector.projection_dim != header.embedding_length:
        raise PlanError(
            f"{loaded.path}: mmproj: '{projector.file}' hands the model {projector.projection_dim}-wide embeddings, "
            f"but the model's embedding width is {header.embedding_length}: it is another model's projector"
        )


def estimate_settings(manifest: Manifest, n_gpus: int = 1, parallel: int | None = None) -> EstimateSettings:
    """What the estimator needs from a manifest's ``[server]`` table, for ``n_gpus`` GPUs and
    ``parallel`` slots (default: the manifest's ``parallel``, else one)."""
    server = manifest.server
    return EstimateSettings(
        context=manifest.context,
        n_batch=server.n_batch,
        n_ubatch=server.n_ubatch,
        flash_attn=server.flash_attn,
        kv_cache_type=server.kv_cache_type,
        swa_full=server.swa_full,
        ctx_checkpoints=server.ctx_checkpoints,
        n_gpus=n_gpus,
        embeddings=server.embeddings,
        parallel=parallel or server.parallel or 1,
    )


def gib(n_bytes: int | float) -> str:
    """``21.4 GiB``: how plans show memory."""
    return f"{n_bytes / GIB:,.1f} GiB"


def params_label(params: int) -> str:
    """``18.4B``, ``494M``: how plans show parameter counts."""
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M"


def breakdown(est: MemoryEstimate) -> str:
    """``weights 18.2 GiB + KV 3.0 GiB + compute 0.3 GiB + overhead 0.5 GiB``, over all GPUs; with
    ``[server] embeddings``, the runtime's second context too (its KV cache, compute buffer and CUDA backend)."""
    projector = f" + projector {gib(est.projector)}" if est.projector else ""
    embeddings = f" + embeddings context {gib(est.embeddings)}" if est.embeddings_context else ""
    return (
        f"weights {gib(est.weights)} + KV {gib(est.kv)} + compute {gib(est.compute)} + overhead {gib(est.overhead)}"
        f"{projector}{embeddings}"
    )


# ## Planning


class _Sizer:
    """The estimate for each GPU count (weights split over GPUs) and slot count, each computed once.

    ``parallel`` is the slot count the GPU is chosen for: the manifest's, else one.
    """

    def __init__(
        self, loaded: LoadedManifest, facts: ModelFacts, catalogue: Catalogue, estimator: Estimator, parallel: int
    ) -> None:
        self.loaded, self.facts, self.catalogue, self.estimator = loaded, facts, catalogue, estimator
        self.parallel = parallel
        self._cache: dict[tuple[int, int], MemoryEstimate] = {}

    def estimate(self, count: int, parallel: int | None = None) -> MemoryEstimate:
        key = (count, parallel or self.parallel)
        if key not in self._cache:
            settings = estimate_settings(self.loaded.manifest, *key)
            self._cache[key] = add_projector(self.estimator(self.facts.header, settings), self.facts.projector)
        return self._cache[key]

    def fits(self, gpu_type: str, count: int, parallel: int | None = None) -> bool:
        gpu = self.catalogue.gpus[gpu_type]
        return count <= gpu.max_count and self.estimate(count, parallel).per_gpu <= gpu.usable_bytes

    def choice(self, gpu_type: str, count: int) -> GpuChoice:
        gpu = self.catalogue.gpus[gpu_type]
        return GpuChoice(gpu_type, count, round(gpu.usd_per_hour * count, 2), gpu.usable_bytes)

    def too_small(self, gpu_type: str, count: int) -> str:
        """``L4 holds 15.7 GiB (70 % of 22.5 GiB); the model needs 21.4 GiB per GPU (…)``."""
        gpu, est = self.catalogue.gpus[gpu_type], self.estimate(count)
        spelled = gpu_type if count == 1 else f"{count}× {gpu_type}"
        slots = f" with {self.parallel} slots" if self.parallel > 1 else ""
        return (
            f"{spelled} offers {gib(gpu.usable_bytes)} usable per GPU ({gpu.usable_fraction:.0%} of "
            f"{gib(gpu.memory_bytes)}) but the model needs {gib(est.per_gpu)} per GPU{slots} ({breakdown(est)})"
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
    sizer = _Sizer(loaded, facts, catalogue, estimator, parallel=loaded.manifest.server.parallel or 1)
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
    # every GPU set Modal may start must hold the slots: an override's whole list, else the choice
    slots = _slots(sizer, (chosen, *fallbacks) if fallbacks is not None else (chosen,))
    if fallbacks is None:  # an override's list is used as given
        fallbacks = _fallbacks(sizer, chosen, row_fallbacks, slots.parallel)
    return Plan(
        manifest=loaded,
        facts=facts,
        estimate=sizer.estimate(chosen.count, slots.parallel),
        gpu=chosen,
        fallbacks=fallbacks,
        reason=reason,
        cheapest=cheapest or chosen,
        slots=slots,
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


def _slots(sizer: _Sizer, sets: Sequence[GpuChoice]) -> Slots:
    """The slots: the manifest's ``parallel``, else as many full-context slots as every one of
    ``sets`` holds, at most :data:`MAX_AUTO_SLOTS` and ``[scaling] concurrency``; at least one."""
    manifest = sizer.loaded.manifest
    wanted, concurrency = manifest.server.parallel, manifest.scaling.concurrency
    if wanted is not None:  # the GPU was chosen (or the override checked) for this many
        reason = f"[server] parallel = {wanted} in the manifest (the estimate holds their KV cache)"
        return Slots(wanted, concurrency or default_concurrency(wanted), reason)
    cap = min(MAX_AUTO_SLOTS, concurrency or MAX_AUTO_SLOTS)
    parallel = 1  # the GPU was chosen so that one slot fits
    while parallel < cap and all(sizer.fits(s.type, s.count, parallel + 1) for s in sets):
        parallel += 1
    # the tightest GPU set: the one a slot more would overflow first
    tight = min(sets, key=lambda s: s.usable_bytes - sizer.estimate(s.count, parallel + 1).per_gpu)
    need = sizer.estimate(tight.count, parallel).per_gpu
    tightest = " (the tightest listed)" if len(sets) > 1 else ""
    spelled = tight.type if tight.count == 1 else f"{tight.count}× {tight.type}"
    where = f"{spelled}'s {gib(tight.usable_bytes)} usable per GPU{tightest}"
    held = f"with {_count(parallel, 'slot')} of {manifest.context:,} tokens the model needs {gib(need)} of {where}"
    if parallel == cap == MAX_AUTO_SLOTS:
        reason = f"the most the planner gives: {held}"
    elif parallel == cap:
        reason = f"capped by [scaling] concurrency = {concurrency}: {held}"
    else:
        more = sizer.estimate(tight.count, parallel + 1).per_gpu
        reason = f"as many as fit beside weights, compute and overhead: {held}; {parallel + 1} would need {gib(more)}"
    return Slots(parallel, concurrency or default_concurrency(parallel), reason)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _fallbacks(sizer: _Sizer, chosen: GpuChoice, preferred: tuple[str, ...], parallel: int) -> tuple[GpuChoice, ...]:
    """Types that also hold the estimate with ``parallel`` slots: the row's own first, then others
    of the same or more memory by price."""
    gpus: dict[str, GpuType] = sizer.catalogue.gpus
    floor = gpus[chosen.type].memory_mib * SAME_MEMORY
    by_price = sorted(gpus, key=lambda t: (gpus[t].usd_per_hour, t))
    found: list[GpuChoice] = []
    for gpu_type in dict.fromkeys((*preferred, *by_price)):
        # the row's own fallbacks are the table's word ("B200 (fallback H200)"): no memory floor
        big_enough = gpu_type in preferred or gpus[gpu_type].memory_mib >= floor
        if gpu_type != chosen.type and big_enough and sizer.fits(gpu_type, chosen.count, parallel):
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
