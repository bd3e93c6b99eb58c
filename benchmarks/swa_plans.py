"""The planner before and after issue 20: sliding-window models with ``swa_full`` true and false.

Header-only real-size files of Gemma 3 27B Q4_K_M, gpt-oss-20b and gpt-oss-120b (MXFP4 experts)
from ``tests/ggufgen.py`` (the files the plan tests read), planned by ``deployer.plan.plan`` with
the GPU catalogue, at 32k and 128k contexts, without ``[server] parallel``: the GPU the table (or
the escalation) gives for one slot, then as many slots as fit, at most 8. No network, no GPU.

    .venv/bin/python -m benchmarks.swa_plans
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import tomli_w

from deployer.catalogue import load_catalogue
from deployer.errors import PlanError
from deployer.facts import ModelFacts, ShardFacts
from deployer.gguf_header import read_header
from deployer.loading import parse_manifest
from deployer.plan import Plan, gib, plan
from tests import ggufgen

MODELS = (ggufgen.GEMMA3_27B_Q4KM, ggufgen.GPT_OSS_20B, ggufgen.GPT_OSS_120B)
CONTEXTS = (32768, 131072)


def _words(result: Plan | str) -> str:
    if isinstance(result, str):
        return result
    est = result.estimate
    return (
        f"{result.gpu.modal}, **{result.slots.parallel}** slot{'s' * (result.slots.parallel != 1)}: {gib(est.per_gpu)} "
        f"(KV {gib(est.kv)}), RAM {gib(est.host)}, ${result.gpu.usd_per_hour:.2f}/h"
    )


def main() -> int:
    catalogue = load_catalogue()
    print("| model | context | swa_full = true (before) | swa_full = false (after) |")
    print("|---|--:|---|---|")
    with tempfile.TemporaryDirectory(prefix="swa-plans-") as folder:
        for spec in MODELS:
            path = ggufgen.write_gguf(Path(folder) / f"{spec.name}.gguf", spec, header_only=True)
            shard = ShardFacts(path.name, path.stat().st_size, None)
            facts = ModelFacts("org/model-GGUF", "main", "c" * 40, (shard,), read_header(path))
            for context in CONTEXTS:
                row: list[Plan | str] = []
                for swa_full in (True, False):
                    data = {"repo": "org/model-GGUF", "file": "m.gguf", "quant": spec.quant, "context": context}
                    loaded = parse_manifest(
                        tomli_w.dumps({**data, "server": {"swa_full": swa_full}}).encode(), "m.toml"
                    )
                    try:
                        row.append(plan(loaded, facts, catalogue))
                    except PlanError as exc:
                        row.append(f"no plan: {exc}")
                print(f"| {spec.name} {spec.quant} | {context:,} | {_words(row[0])} | {_words(row[1])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
