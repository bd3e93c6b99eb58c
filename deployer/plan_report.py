"""Plans shown to people and machines: JSON data, Markdown for a pull request, rich tables.

Pure: plans in, data or text out. The CLI (``deployer/cli/plan.py``) prints them.

    plan_json(results)        -> list[dict]   the --json array (a failure: name, path, error)
    plan_markdown(results)    -> str          a pull-request summary
    plan_tables(results)      -> list[Table]  the default terminal view, one table per plan
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from deployer.plan import GpuChoice, Plan, PlanFailure, breakdown, gib, params_label
from deployer.projector import summary
from deployer.quants import QUANTIZER_QUANTS

if TYPE_CHECKING:
    from rich.table import Table

Result = Plan | PlanFailure


def plan_json(results: Sequence[Result]) -> list[dict[str, Any]]:
    """One object per manifest, in order: a plan's facts and choice, or ``name``, ``path`` and ``error``."""
    return [_failure_json(r) if isinstance(r, PlanFailure) else _plan_json(r) for r in results]


def _failure_json(failure: PlanFailure) -> dict[str, Any]:
    return {"name": failure.name, "path": failure.path, "error": failure.error}


def _plan_json(plan: Plan) -> dict[str, Any]:
    manifest, facts, header, est = plan.manifest.manifest, plan.facts, plan.facts.header, plan.estimate
    return {
        "name": plan.manifest.name,
        "path": plan.manifest.path,
        "repo": facts.repo,
        "revision": facts.revision,
        "commit": facts.commit,
        "file": facts.file,
        "shards": [{"file": s.file, "size_bytes": s.size, "sha256": s.sha256} for s in facts.shards],
        "size_bytes": facts.size_bytes,
        "conversion": _conversion_json(plan),
        "params": header.params,
        "arch": header.arch,
        "experts": {"count": header.expert_count, "used": header.expert_used_count},
        "quant": manifest.quant,
        "context": manifest.context,
        "trained_context": header.context_length,
        "chat": {
            "chat_format": manifest.server.chat_format,
            "template_in_gguf": header.has_chat_template,
            "learned": _learned(plan),
        },
        "projector": _projector_json(plan),
        "slots": {
            "parallel": plan.slots.parallel,
            "concurrency": plan.slots.concurrency,
            "reason": plan.slots.reason,
        },
        "kv_cache": _kv_json(plan),
        "estimate_bytes": {
            "weights": est.weights,
            "kv": est.kv,
            "compute": est.compute,
            "overhead": est.overhead,
            "projector": est.projector,
            "embeddings": est.embeddings,
            "total": est.total,
            "per_gpu": est.per_gpu,
            "host": est.host,
        },
        "gpu": {
            "type": plan.gpu.type,
            "count": plan.gpu.count,
            "fallbacks": [f.modal for f in plan.fallbacks],
            "reason": plan.reason,
        },
        "modal_gpus": plan.modal_gpus,
        "headroom_bytes": plan.headroom_bytes,
        "usd_per_hour": plan.gpu.usd_per_hour,
        "cheapest": _choice_json(plan.cheapest),
        "policy": plan.policy,
    }


def _kv_json(plan: Plan) -> dict[str, Any] | None:
    layout = plan.estimate.kv_layout
    if layout is None:
        return None
    return {
        "swa_full": plan.manifest.manifest.server.swa_full,
        "global_layers": layout.global_layers,
        "global_tokens": layout.global_cells,
        "windowed_layers": layout.windowed_layers,
        "windowed_tokens": layout.windowed_cells,
        "slots": layout.slots,
        "bytes": plan.estimate.kv,
    }


def _choice_json(choice: GpuChoice) -> dict[str, Any]:
    return {"type": choice.type, "count": choice.count, "usd_per_hour": choice.usd_per_hour}


# ## Words shared by the Markdown and the tables


def _gpu_words(choice: GpuChoice) -> str:
    return choice.type if choice.count == 1 else f"{choice.count}× {choice.type}"


def _cheapest_words(plan: Plan) -> str:
    if plan.cheapest == plan.gpu:
        return "the choice itself"
    return f"{_gpu_words(plan.cheapest)} at ${plan.cheapest.usd_per_hour:.2f}/h"


def _experts_words(plan: Plan) -> str:
    header = plan.facts.header
    return (
        f"{header.expert_count} ({header.expert_used_count} used per token)" if header.expert_count else "none (dense)"
    )


def _size_words(plan: Plan) -> str:
    shards = len(plan.facts.shards)
    size = f"{plan.facts.size_bytes / 1e9:,.2f} GB"
    if plan.facts.conversion is not None:
        return f"{size} predicted"
    return size if shards == 1 else f"{size} in {shards} shards"


def _conversion_json(plan: Plan) -> dict[str, Any] | None:
    conversion = plan.facts.conversion
    if conversion is None:
        return None
    return {
        "source": conversion.source,
        "architecture": conversion.architecture,
        "files": [{"file": f.file, "size_bytes": f.size, "sha256": f.sha256} for f in conversion.files],
        "source_bytes": conversion.source_bytes,
        "quant": conversion.quant,
        "predicted_bytes": plan.facts.size_bytes,
    }


def _conversion_words(plan: Plan) -> list[tuple[str, str]]:
    """The "convert" row of a plan whose GGUF is made from Transformers weights; none otherwise."""
    conversion = plan.facts.conversion
    if conversion is None:
        return []
    weights = [f for f in conversion.files if f.file.endswith((".safetensors", ".bin"))]
    words = (
        f"from {conversion.source} weights ({conversion.architecture}, {len(weights)} file(s), "
        f"{conversion.source_bytes / 1e9:,.2f} GB) to {conversion.quant} with llama.cpp's {_tools(conversion.quant)}, "
        f"once, before the first deploy: about {plan.facts.size_bytes / 1e9:,.2f} GB"
    )
    return [("convert", words)]


def _tools(quant: str) -> str:
    return "converter and quantizer" if quant in QUANTIZER_QUANTS else "converter"


def _learned(plan: Plan) -> str | None:
    """What the runtime will learn from the GGUF's chat template: tool-call syntax and reasoning markers."""
    header = plan.facts.header
    if plan.manifest.manifest.server.chat_format or not header.chat_template:
        return None
    from deployer.runtime.chat.template import ChatTemplate

    try:
        chat = ChatTemplate.load(template=header.chat_template, chat_format=None, bos_token="", eos_token="")
    except ValueError as exc:  # not valid Jinja: the server will say the same when it loads the model
        return f"the template does not compile ({exc})"
    return chat.summary() if chat is not None else None


def _chat_words(plan: Plan) -> str:
    chat_format = plan.manifest.manifest.server.chat_format
    if chat_format:
        return f"chat_format '{chat_format}' (the manifest's)"
    if plan.facts.header.has_chat_template:
        return f"the GGUF's own chat template; {_learned(plan)}"
    return "none: /v1/chat/completions will answer 400 (no template in the GGUF; set [server] chat_format)"


def _projector_words(plan: Plan) -> list[tuple[str, str]]:
    """``vision: gemma3 projector, 896 px, 1.9 GiB (…)``; nothing for a text-only model."""
    projector = plan.facts.projector
    return [] if projector is None else [(projector.modalities, f"{projector.file}: {summary(projector)}")]


def _projector_json(plan: Plan) -> dict[str, Any] | None:
    projector = plan.facts.projector
    if projector is None:
        return None
    return {**asdict(projector), "compute_bytes": projector.compute_bytes, "memory_bytes": projector.memory_bytes}


def _slots_words(plan: Plan) -> str:
    slots = plan.slots
    return f"{slots.parallel} × {plan.manifest.manifest.context:,} tokens: {slots.reason}"


def _concurrency_words(plan: Plan) -> str:
    slots = plan.slots
    return (
        f"{slots.concurrency} requests per container ({slots.parallel} decoding, {slots.queued} queued; "
        f"beyond it 429); Modal adds a container when all {slots.parallel} slots are busy"
    )


def _estimate_words(plan: Plan) -> str:
    est = plan.estimate
    per_gpu = f", {gib(est.per_gpu)} per GPU" if est.n_gpus > 1 else ""
    return f"{gib(est.total)}{per_gpu} = {breakdown(est)}; container RAM {gib(est.host)}"


def _kv_words(plan: Plan) -> list[tuple[str, str]]:
    """``10 global layers × 32,768 tokens + 52 windowed layers × 1,536 tokens, × 8 slots``."""
    layout = plan.estimate.kv_layout
    if layout is None:
        return []
    parts = []
    if layout.global_layers:
        kind = "global " if layout.windowed_layers else ""
        parts.append(f"{_count(layout.global_layers, kind + 'layer')} × {layout.global_cells:,} tokens")
    if layout.windowed_layers:
        parts.append(f"{_count(layout.windowed_layers, 'windowed layer')} × {layout.windowed_cells:,} tokens")
    words = " + ".join(parts) + f", × {_count(layout.slots, 'slot')} = {gib(plan.estimate.kv)}"
    if layout.windowed_layers and plan.manifest.manifest.server.swa_full:
        words += " ([server] swa_full: the windowed layers cache the whole context)"
    return [("KV", words)]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _headroom_words(plan: Plan) -> str:
    return f"{gib(plan.headroom_bytes)} of {gib(plan.gpu.usable_bytes)} usable per GPU"


# ## Markdown


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell (manifest strings never become markup)."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "'").replace("<", "&lt;").replace("\n", " ")


def plan_markdown(results: Sequence[Result]) -> str:
    """A pull-request summary: one table row per manifest, details below, failures last."""
    plans = [r for r in results if isinstance(r, Plan)]
    failures = [r for r in results if isinstance(r, PlanFailure)]
    lines = ["### gguf-deploy plan", ""]
    if plans:
        lines += [
            "| model | GPU | fallbacks | slots | memory (estimate) | headroom | $/h warm | cheapest fitting |",
            "|---|---|---|--:|---|---|---|---|",
        ]
        for p in plans:
            fallbacks = ", ".join(_gpu_words(f) for f in p.fallbacks) or "none"
            lines.append(
                f"| {_md(p.manifest.name)} | {_md(_gpu_words(p.gpu))} | {_md(fallbacks)} | {p.slots.parallel} "
                f"| {gib(p.estimate.total)} "
                f"| {gib(p.headroom_bytes)} | ${p.gpu.usd_per_hour:.2f} | {_md(_cheapest_words(p))} |"
            )
        lines.append("")
        for p in plans:
            lines += [f"<details><summary>{_md(p.manifest.name)} ({_md(p.manifest.path)})</summary>", ""]
            lines += [f"- **{key}**: {_md(value)}" for key, value in _details(p)]
            lines += ["", "</details>", ""]
    if failures:
        lines += ["**Failed**", ""]
        lines += [f"- {_md(f.error)}" for f in failures]
        lines.append("")
    lines.append(f"{len(plans)} planned, {len(failures)} failed.")
    return "\n".join(lines) + "\n"


def _details(plan: Plan) -> list[tuple[str, str]]:
    facts, header, manifest = plan.facts, plan.facts.header, plan.manifest.manifest
    return [
        ("model", f"{facts.repo} @ {facts.revision} = {facts.commit}"),
        ("file", f"{facts.file} ({_size_words(plan)})"),
        *_conversion_words(plan),
        ("parameters", f"{params_label(header.params)} ({header.params:,}), {header.arch}"),
        ("experts", _experts_words(plan)),
        ("quant", manifest.quant),
        ("context", f"{manifest.context:,} of {header.context_length:,} trained"),
        ("chat", _chat_words(plan)),
        *_projector_words(plan),
        ("slots", _slots_words(plan)),
        ("concurrency", _concurrency_words(plan)),
        ("estimate", _estimate_words(plan)),
        *_kv_words(plan),
        ("GPU", f"{_gpu_words(plan.gpu)}: {plan.reason}"),
        ("fallbacks", ", ".join(_gpu_words(f) for f in plan.fallbacks) or "none"),
        ("headroom", _headroom_words(plan)),
        ("cost", f"${plan.gpu.usd_per_hour:.2f}/h while warm; nothing while scaled to zero"),
        ("cheapest fitting", _cheapest_words(plan)),
    ]


# ## Rich tables


def plan_tables(plans: Sequence[Plan]) -> list[Table]:
    """One two-column table per plan, titled with its name and manifest path."""
    from rich.markup import escape
    from rich.table import Table

    tables = []
    for plan in plans:
        table = Table(
            title=f"[bold]{escape(plan.manifest.name)}[/bold]  {escape(plan.manifest.path)}",
            title_justify="left",
            show_header=False,
            box=None,
            padding=(0, 2),
        )
        table.add_column(style="bold cyan", no_wrap=True)
        table.add_column(overflow="fold")
        for key, value in _details(plan):
            table.add_row(key, escape(value))
        tables.append(table)
    return tables
