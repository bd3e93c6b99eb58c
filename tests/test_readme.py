"""README.md stays true: its set-up and test commands are what CI runs, every manifest key is documented."""

from __future__ import annotations

import re

from deployer.manifest import manifest_schema
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
CI = (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def _sh_blocks() -> list[str]:
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S)]


def test_setup_is_one_command_and_ci_runs_it():
    setup = _sh_blocks()[0]
    assert "\n" not in setup
    assert setup in CI.splitlines()


def test_ci_runs_the_readme_test_command():
    assert "\n.venv/bin/pytest\n" in CI
    assert ".venv/bin/pytest" in _sh_blocks()


def test_every_manifest_key_is_documented():
    schema = manifest_schema()
    keys = list(schema["properties"])
    for table in ("ServerSettings", "ScalingSettings", "AuthSettings"):
        keys += list(schema["$defs"][table]["properties"])
    missing = [key for key in keys if f"| `{key}` |" not in README and f"### `[{key}]`" not in README]
    assert not missing, f"README's manifest reference lacks {missing}"
