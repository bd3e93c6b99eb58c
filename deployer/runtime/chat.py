"""Chat requests in the model's own format: the prompt (tools included), the grammar, and the answer parsed back.

    ChatTemplate.load(template=, chat_format=, bos_token=, eos_token=, reasoning_format=)   once, at model load
    ChatTemplate.render(messages, tools=, tool_choice=, parallel_tool_calls=) -> RenderedChat
    RenderedChat.parser() -> ChatParser        one per choice: feed(text) -> deltas; finish() -> message
                                               (deployer.runtime.chat_parser)

A GGUF's Jinja template is rendered the way Hugging Face ``transformers.apply_chat_template`` renders
it (sandboxed; ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``, ``eos_token``). Its
family (:mod:`deployer.runtime.chat_families`) says how the model writes tool calls, which the parser
reads back into OpenAI's ``tool_calls``, and which grammar forces them for ``tool_choice`` "required"
or a named function. ``<think>...</think>`` goes to ``reasoning_content``. A llama-cpp-python
``chat_format`` builds the prompt with its formatter and has no tools.

Pure: llama_cpp is imported only to look a ``chat_format`` up and to convert JSON schemas to GBNF.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from deployer.runtime.chat_families import (
    GENERIC,
    Family,
    call_rule,
    calls_rule,
    detect_family,
    gbnf_literal,
    xml_call_rule,
)
from deployer.runtime.chat_parser import THINK_CLOSE, THINK_OPEN, ChatParser, ParseSpec
from deployer.runtime.protocol import bad_request

PROBE_TOOL = "gguf_deploy_probe_tool"  # rendered once at load: does the template show tools at all?


class TemplateRaised(Exception):
    """``raise_exception(message)`` called by a chat template: the request breaks the template's rules."""


# ## The template


def _environment() -> Any:
    """Jinja as ``transformers`` sets it up for chat templates (sandboxed, immutable)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRaised(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant tokens with it): the body as is."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    extensions = [jinja2.ext.loopcontrols, Generation]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class RenderedChat:
    """One request's prompt in the model's format, and how to read the answer back."""

    prompt: str  # tokenize with special tokens parsed
    add_bos: bool  # prepend BOS (the template did not write it, and the model's tokenizer adds one)
    stop: tuple[str, ...]  # extra stop strings of the format
    grammar: str | None  # GBNF forcing tool calls (tool_choice "required" or a named function)
    spec: ParseSpec = field(default_factory=lambda: ParseSpec(None))
    # texts the parser must see even where they are special tokens (Mistral's [TOOL_CALLS], Llama's
    # <|python_tag|>, <think>): detokenize those tokens with their text, as llama-server's preserved_tokens
    preserved: tuple[str, ...] = ()

    def parser(self) -> ChatParser:
        """A fresh parser, for one choice."""
        return ChatParser(self.spec)


class ChatTemplate:
    """How one model formats chat: its Jinja template (with a family), or a llama-cpp-python chat_format."""

    def __init__(
        self,
        *,
        source: str | None,
        formatter: Any,
        name: str,
        bos_token: str,
        eos_token: str,
        reasoning_format: str,
        add_bos_token: bool,
    ) -> None:
        self.source = source
        self.family_info: Family | None = None
        self._formatter = formatter
        self._bos, self._eos = bos_token, eos_token
        self._add_bos_token = add_bos_token
        self._compiled: Any = None
        self.thinks = False
        self.supports_tools = False
        self.family = name
        if source is not None:
            try:
                self._compiled = _environment().from_string(source)
            except Exception as exc:  # jinja2.TemplateSyntaxError, or a sandbox refusal
                raise ValueError(f"the model's chat template is not valid Jinja: {exc}") from exc
            # the closing tag is what templates strip from earlier turns (some never write the opening one)
            self.thinks = reasoning_format == "auto" and THINK_CLOSE in source
            self.supports_tools = self._renders_tools()
            self.family_info = detect_family(source) if self.supports_tools else None
            self.family = self.family_info.name if self.family_info else "no-tools"

    @classmethod
    def load(
        cls,
        *,
        template: str | None,
        chat_format: str | None,
        bos_token: str,
        eos_token: str,
        reasoning_format: str = "auto",
        add_bos_token: bool = True,
    ) -> ChatTemplate | None:
        """The model's chat formatting; None when it has none. A ``chat_format`` wins over the template.

        ``add_bos_token`` is the model's ``tokenizer.ggml.add_bos_token`` (llama.cpp's default: true).
        ValueError for an unknown chat_format or a template that does not compile.
        """
        common = {"bos_token": bos_token, "eos_token": eos_token, "reasoning_format": reasoning_format}
        if chat_format is not None:
            formatter = _formatter(chat_format)
            return cls(source=None, formatter=formatter, name=chat_format, add_bos_token=add_bos_token, **common)
        if not template:
            return None
        return cls(source=template, formatter=None, name="", add_bos_token=add_bos_token, **common)

    def _renders_tools(self) -> bool:
        schema = {"type": "object", "properties": {}}
        probe = {"type": "function", "function": {"name": PROBE_TOOL, "description": "", "parameters": schema}}
        try:
            text = self._render_jinja([{"role": "user", "content": "hi"}], [probe])
        except Exception:  # a template that cannot take tools (or any probe message) has no tool support
            return False
        return PROBE_TOOL in text

    def _render_jinja(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        variables: dict[str, Any] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> str:
        return str(
            self._compiled.render(
                **(variables or {}),  # the request's template variables (enable_thinking, ...) never win over ours
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        )

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, Any] | None = None,
        parallel_tool_calls: bool = True,
        variables: dict[str, Any] | None = None,
        continue_final: bool = False,
    ) -> RenderedChat:
        """The prompt of a request (messages as ``protocol.normalize_chat`` leaves them); ApiError 400.

        ``variables`` are extra template variables (``enable_thinking``, ``reasoning_effort``, ...);
        ``continue_final``: the last (assistant) message is left open, so the answer continues it.
        """
        choice = tool_choice if tool_choice is not None else ("auto" if tools else "none")
        use_tools = bool(tools) and choice != "none"
        if use_tools and self._formatter is not None:
            raise bad_request(
                f"this model formats chat with chat_format '{self.family}', which has no tool support: "
                "tools cannot be used (set tool_choice to 'none', or serve the model with its own chat template)",
                "tools",
                "tools_not_supported",
            )
        if use_tools and not self.supports_tools:
            raise bad_request(
                "this model's chat template has no place for tools (it would drop them): tools cannot be used "
                "with this model (set tool_choice to 'none')",
                "tools",
                "tools_not_supported",
            )
        named = _named(choice, tools or []) if use_tools else None
        plain = [_template_message(m) for m in messages]
        if self._formatter is not None:
            if continue_final or variables:
                what = "continuing an assistant message" if continue_final else "template variables"
                raise bad_request(f"chat_format '{self.family}' does not support {what}", "messages")
            return self._render_format(plain)
        render = partial(self._render_jinja, variables=variables, add_generation_prompt=not continue_final)
        shown = (tools or None) if use_tools else None  # a named choice still shows the model every tool
        offered = [t for t in tools or [] if t["function"]["name"] == named] if named else (shown or [])
        try:
            try:
                prompt = render(plain, shown)
            except TemplateRaised:
                raise
            except Exception:
                if plain == messages:
                    raise
                # a few templates (functionary) write the arguments as the string they came as
                prompt = render([_template_message(m, objects=False) for m in messages], shown)
        except TemplateRaised as exc:
            raise bad_request(f"the model's chat template refused these messages: {exc}", "messages") from exc
        except Exception as exc:  # a real template's error is about the request, never a server fault
            raise bad_request(
                f"the model's chat template could not render these messages ({type(exc).__name__}: {exc})",
                "messages",
                "chat_template_error",
            ) from exc
        if continue_final:
            prompt = _open_final(prompt, messages[-1].get("content") or "")
        think_open = self.thinks and prompt.rstrip().endswith(THINK_OPEN)
        family = self.family_info or GENERIC
        grammar = None
        if use_tools and (choice == "required" or named):
            grammar = tool_grammar(family, offered, parallel_tool_calls and not named, self.thinks, think_open)
        stop = tuple(s for s in (self._eos, *family.stop) if s)
        spec = ParseSpec(
            family if use_tools else None,
            tuple(offered),
            parallel_tool_calls and not named,
            grammar is not None,
            self.thinks,
            think_open,
        )
        add_bos = self._add_bos_token and bool(self._bos) and not prompt.startswith(self._bos)
        preserved = (*(family.markers if use_tools else ()), *((THINK_OPEN, THINK_CLOSE) if self.thinks else ()))
        return RenderedChat(prompt, add_bos, stop, grammar, spec, preserved)

    def _render_format(self, messages: list[dict[str, Any]]) -> RenderedChat:
        for message in messages:  # the stock formatters read content as text
            if not isinstance(message.get("content"), str):
                message["content"] = ""
        try:
            result = self._formatter(messages=messages)
        except Exception as exc:
            raise bad_request(
                f"chat_format '{self.family}' could not format these messages ({type(exc).__name__}: {exc})",
                "messages",
            ) from exc
        stop = result.stop if isinstance(result.stop, list) else [result.stop] if result.stop else []
        return RenderedChat(result.prompt, self._add_bos_token and not result.added_special, tuple(stop), None)


def _formatter(name: str) -> Any:
    """The prompt formatter llama-cpp-python registered as ``name`` (``format_gemma`` for "gemma", ...)."""
    import inspect

    from llama_cpp import llama_chat_format

    try:
        handler = llama_chat_format.LlamaChatCompletionHandlerRegistry().get_chat_completion_handler_by_name(name)
    except Exception as exc:
        raise ValueError(f"chat_format '{name}' is not one llama-cpp-python knows") from exc
    formatter = inspect.getclosurevars(handler).nonlocals.get("chat_formatter")
    if formatter is None:
        raise ValueError(f"chat_format '{name}' has its own handler, not a prompt format this server can use")
    return formatter


def _open_final(prompt: str, text: str) -> str:
    """The prompt cut right after the last assistant message's text: the answer continues it
    (as vLLM's ``continue_final_message`` does; the template closed the turn after it)."""
    for written in (text, text.strip()):  # some templates trim the content
        at = prompt.rfind(written) if written else -1
        if at >= 0:
            return prompt[: at + len(written)]
    raise bad_request(
        "the model's chat template does not write the final assistant message as given, so it cannot be "
        "continued (end the conversation with a user message, or send add_generation_prompt: true)",
        "messages",
    )


def _named(choice: str | dict[str, Any], tools: list[dict[str, Any]]) -> str | None:
    if not isinstance(choice, dict):
        return None
    name = choice["function"]["name"]
    if all(t["function"]["name"] != name for t in tools):
        raise bad_request(f"tool_choice names '{name}', which is not in tools", "tool_choice")
    return str(name)


def _template_message(message: dict[str, Any], *, objects: bool = True) -> dict[str, Any]:
    """A message as chat templates read it: content present, call arguments as objects (as transformers
    documents them) unless ``objects`` is false."""
    out = dict(message)
    if out.get("content") is None:  # templates test it as text ('</think>' in content, content + ...)
        refusal = out.get("refusal")
        out["content"] = refusal if isinstance(refusal, str) else ""
    calls = out.get("tool_calls")
    if calls and objects:
        out["tool_calls"] = [_template_call(c) for c in calls]
    return out


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):  # templates write the arguments with tojson: an object, as transformers expects
        with contextlib.suppress(json.JSONDecodeError):
            function["arguments"] = json.loads(arguments)
    return {**call, "function": function}


# ## Grammars


def tool_grammar(family: Family, tools: list[dict[str, Any]], parallel: bool, thinks: bool, think_open: bool) -> str:
    """GBNF: one (or, when ``parallel``, one or more) calls of ``tools`` in the family's syntax."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alternatives = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        try:
            resolved = converter.resolve_refs(schema, f"tool-{i}")
            args_rule = converter.visit(resolved, f"tc-args-{i}")
        except Exception as exc:  # the converter raises plain exceptions on schemas it cannot express
            raise bad_request(
                f"the parameters schema of tool '{function['name']}' cannot be turned into a grammar: {exc}", "tools"
            ) from exc
        if family.syntax == "xml":
            alternatives.append(_xml_rule(converter, family, function["name"], resolved, i))
            continue
        alternatives.append(call_rule(family, function["name"], args_rule))
    rules = [converter.format_grammar(), f"tc-call ::= {' | '.join(alternatives)}"]
    rules.append(f"tc-calls ::= {calls_rule(family, 'tc-call', parallel)}")
    if think_open:  # the template opened <think>: the model thinks first, then calls
        rules.append(f"root ::= [^<]* {gbnf_literal(THINK_CLOSE)} [ \\t\\n]* tc-calls")
    elif thinks:
        rules.append(f"root ::= ( {gbnf_literal(THINK_OPEN)} [^<]* {gbnf_literal(THINK_CLOSE)} [ \\t\\n]* )? tc-calls")
    else:
        rules.append("root ::= tc-calls")
    return "\n".join(rules) + "\n"


def _xml_rule(converter: Any, family: Family, name: str, schema: dict[str, Any], i: int) -> str:
    """One XML call: strings as plain text, other values as the JSON their schema allows."""
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    rules = []
    for j, (key, spec) in enumerate(properties.items()):
        is_text = isinstance(spec, dict) and spec.get("type") == "string" and not spec.get("enum")
        value = "tc-text" if is_text else converter.visit(spec if isinstance(spec, dict) else {}, f"tc-{i}-{j}")
        rules.append((key, value, key in required))
    converter._add_rule("tc-text", "[^<]*")
    return xml_call_rule(family, name, rules)
