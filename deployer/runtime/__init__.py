"""The serving runtime: llama-cpp-python's OpenAI-compatible server, hardened.

Runs locally (``gguf-deploy serve``) and in the Modal container. Lean by design: importing it
must not import planning, rendering or modal. It takes one :class:`RuntimeConfig`.
"""

from deployer.runtime.config import RuntimeConfig

__all__ = ["RuntimeConfig"]
