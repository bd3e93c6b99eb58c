"""Import hygiene: the core never pulls in llama.cpp; the CLI loads commands on demand."""

from __future__ import annotations

import subprocess
import sys

import deployer


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return set(out.split())


def test_core_import_pulls_in_neither_llama_cpp_nor_modal():
    loaded = _modules_after("import deployer, deployer.loading, deployer.manifest, deployer.catalogue")
    assert not {"llama_cpp", "modal", "huggingface_hub"} & loaded


def test_validate_does_not_import_modal_or_llama_cpp():
    loaded = _modules_after(
        "from deployer.cli import main\n"
        "try:\n    main(['validate', '-q', 'manifests'], standalone_mode=False)\nexcept SystemExit:\n    pass"
    )
    assert not {"llama_cpp", "modal"} & loaded


def test_public_api_is_lazy_and_complete():
    assert set(deployer.__all__) == {"__version__", *deployer._EXPORTS}
    loaded = _modules_after("import deployer")
    assert not {"pydantic", "deployer.loading", "huggingface_hub"} & loaded


def test_exports_never_shadow_a_submodule():
    import importlib
    import inspect
    import pkgutil

    for name in deployer.__all__:
        getattr(deployer, name)
    for module in pkgutil.iter_modules(deployer.__path__):
        assert inspect.ismodule(importlib.import_module(f"deployer.{module.name}"))
        assert inspect.ismodule(getattr(deployer, module.name)), module.name


def test_public_api():
    assert set(deployer.__all__) >= {"load_manifest", "load_manifests", "manifest_schema", "GgufDeployError"}
    for name in deployer.__all__:
        assert hasattr(deployer, name), name
