"""What a chat template borrows from llama-cpp-python, for tests that load templates without a model.

Imported lazily: a test only needs llama.cpp (the ``model`` marker) when a grammar or a named
chat_format is actually used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def schema_converter() -> Any:
    from deployer.runtime.llama import schema_converter as make

    return make()


def chat_formatter(name: str) -> Callable[..., Any]:
    from deployer.runtime.llama import chat_formatter as find

    return find(name)


LLAMA_PARTS = {"schema_converter": schema_converter, "formatter_of": chat_formatter}
