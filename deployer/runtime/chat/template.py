"""Chat requests in the model's own format: the prompt (tools included), the grammar, and the answer parsed back.

    ChatTemplate.load(template=, chat_format=, bos_token=, eos_token=, reasoning_format=)   once, at model load
    ChatTemplate.render(messages, tools=, tool_choice=, parallel_tool_calls=) -> RenderedChat
    RenderedChat.parser() -> ChatParser        one per choice: feed(text) -> deltas; finish() -> message
                                               (deployer.runtime.chat.parser)

A GGUF's Jinja template is rendered the way Hugging Face ``transformers.apply_chat_template`` renders
it (sandboxed; ``messages``, ``tools``, ``add_generation_prompt``, ``bos_token``, ``eos_token``, and
the request's template variables). Its syntax (:class:`~deployer.runtime.chat.families.Syntax`, learned
from the template by :mod:`deployer.runtime.chat.learn`, or hand-written) says how the model writes
tool calls and reasoning, which the parser reads back into OpenAI's ``tool_calls`` and
``reasoning_content``, and which grammar (:mod:`deployer.runtime.chat.grammar`) forces them for
``tool_choice`` "required" or a named function. A llama-cpp-python ``chat_format`` builds the prompt
with its formatter and has no tools.

Pure: llama_cpp is never imported here; a ``chat_format``'s formatter and the JSON-schema converter
of tool grammars come in through :meth:`ChatTemplate.load` (from the model interface).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from deployer.runtime.chat.families import (
    GENERIC,
    TEMPLATE_VARIABLES,
    TOOL_SHAPES,
    Syntax,
    amend,
    hand_written,
    write_calls,
)
from deployer.runtime.chat.learn import PROBE_TOOL as LEARN_TOOL
from deployer.runtime.chat.learn import NotLearned, learn, learn_reasoning, reasoning_in_parts
from deployer.runtime.chat.parser import THINK_CLOSE, THINK_OPEN, ChatParser, ParseSpec
from deployer.runtime.errors import bad_request

if TYPE_CHECKING:
    from deployer.runtime.config import RuntimeConfig
    from deployer.runtime.engine.model import ModelInterface

PROBE_TOOL = "gguf_deploy_probe_tool"  # rendered once at load: does the template show tools at all?


class TemplateRaised(Exception):
    """``raise_exception(message)`` called by a chat template: the request breaks the template's rules."""


# ## The template


def _environment() -> Any:
    """Jinja as ``transformers`` sets it up for chat templates, sandboxed.

    Sandboxed but not immutable: real templates build lists and dicts of their own (Kimi K2's tool-result
    turn appends to a list); attribute access stays limited to the sandbox's safe set, and no file is reachable.
    """
    import jinja2.ext
    from jinja2.sandbox import SandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateRaised(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys,
                          default=_jsonable)  # fmt: skip

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant tokens with it): the body as is."""

        tags = frozenset({"generation"})

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    extensions = [jinja2.ext.loopcontrols, Generation]
    env = SandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=extensions)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _jsonable(value: Any) -> Any:
    """What ``tojson`` writes for what Jinja makes lazily (``map``/``select`` give generators)."""
    if hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict)):
        return list(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


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
        thinking: bool | None = None,
        schema_converter: Callable[[], Any] | None = None,
    ) -> None:
        self.source = source
        self._schema_converter = schema_converter
        # the manifest's default for thinking, as the variables templates read it (a request's own win)
        self.defaults: dict[str, Any] = {} if thinking is None else {"enable_thinking": thinking, "thinking": thinking}
        self.syntax: Syntax | None = None  # how the model writes calls (None: the template shows no tools)
        self.reasoning: tuple[str, str] = ("", "")  # its reasoning markers, learned ("", "": none)
        self.learned_error = ""  # why no syntax could be learned (the generic one is used)
        self._formatter = formatter
        self._bos, self._eos = bos_token, eos_token
        self._add_bos_token = add_bos_token
        self._compiled: Any = None
        self.thinks = False
        self._reasoning_part = False  # earlier turns' reasoning goes to the template as a "thinking" content part
        self.supports_tools = False  # the model can be given tools (its template writes calls, or shows tools)
        self.shows_tools = False  # the template itself writes the tool definitions into the prompt
        self._reads: set[str] = set()  # the variables the template reads
        self.family = name
        if source is not None:
            try:
                self._compiled = _environment().from_string(source)
            except Exception as exc:  # jinja2.TemplateSyntaxError, or a sandbox refusal
                raise ValueError(f"the model's chat template is not valid Jinja: {exc}") from exc
            import jinja2.meta

            self._reads = jinja2.meta.find_undeclared_variables(self._compiled.environment.parse(source))
            self.shows_tools = self._renders_tools()
            self.syntax = self._learn()
            self.supports_tools = self.syntax is not None
            if self.syntax is not None and self.syntax.reasoning_close:
                self.reasoning = (self.syntax.reasoning_open, self.syntax.reasoning_close)
            else:
                self.reasoning = learn_reasoning(self._reasoning_probe)
            if not self.reasoning[1] and THINK_CLOSE in source:
                # templates that strip <think> from earlier turns never write it back: the closing tag tells
                self.reasoning = (THINK_OPEN, THINK_CLOSE)
            self.thinks = reasoning_format == "auto" and bool(self.reasoning[1])
            self._reasoning_part = bool(self.reasoning[1]) and reasoning_in_parts(self._reasoning_probe, self.reasoning)
            if self.syntax is not None:
                self.syntax = replace(self.syntax, reasoning_open=self.reasoning[0], reasoning_close=self.reasoning[1])
            self.family = (
                "no-tools"
                if self.syntax is None
                else self.syntax.origin + (f":{self.syntax.layout}" if self.syntax.origin == "learned" else "")
            )

    def summary(self) -> str:
        """What was learned, in one line (``gguf-deploy plan``, the README's table)."""
        if self.syntax is None:
            text = "no tools (the template has no place for them)"
        else:
            text = "tools: " + self.syntax.describe().replace("\x1f", "<id>").replace("\n", "\\n")
            if self.syntax.origin == "generic":
                text += f" (generic: {self.learned_error})"
        if self.reasoning[1] and (self.syntax is None or self.syntax.layout != "harmony"):
            text += f"; reasoning {self.reasoning[0] or '(opened by the prompt)'}...{self.reasoning[1]}"
        return text

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
        thinking: bool | None = None,
        formatter_of: Callable[[str], Any] | None = None,
        schema_converter: Callable[[], Any] | None = None,
    ) -> ChatTemplate | None:
        """The model's chat formatting; None when it has none. A ``chat_format`` wins over the template.

        ``add_bos_token`` is the model's ``tokenizer.ggml.add_bos_token`` (llama.cpp's default: true).
        What comes from llama-cpp-python comes through the model interface: ``formatter_of`` looks a
        chat_format up, ``schema_converter`` makes the converter tool-call grammars are built with
        (without one, a required or named tool call is a 400).
        ValueError for an unknown chat_format or a template that does not compile.
        """
        common = {"bos_token": bos_token, "eos_token": eos_token, "reasoning_format": reasoning_format,
                  "thinking": thinking, "schema_converter": schema_converter}  # fmt: skip
        if chat_format is not None:
            if formatter_of is None:
                raise ValueError(f"chat_format '{chat_format}' needs the model's formatter lookup (formatter_of)")
            formatter = formatter_of(chat_format)
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

    def _learn(self) -> Syntax | None:
        """The template's syntax: hand-written where rendering cannot reveal it, else learned; generic for a
        template that shows tools but no call; None for one that does neither."""
        assert self.source is not None
        written = hand_written(self.source)
        if written is not None and self.shows_tools:
            return written
        try:
            return amend(learn(lambda m, gen, v: self._probe(m, gen, v)), self.source)
        except NotLearned as exc:
            self.learned_error = str(exc)
            return GENERIC if self.shows_tools else None

    def _reasoning_probe(self, messages: list[dict[str, Any]], **variables: Any) -> str:
        try:
            return self._probe(messages, False, variables)
        except Exception as exc:  # a template that cannot render the probe shows no reasoning
            raise NotLearned(str(exc)) from exc

    def _probe(self, messages: list[dict[str, Any]], generation: bool, variables: dict[str, Any]) -> str:
        try:
            return self._render_jinja([_template_message(m) for m in messages], [LEARN_TOOL], generation, variables)
        except TemplateRaised:
            raise
        except Exception:  # templates that want the arguments as a string (as they came)
            plain = [_template_message(m, objects=False) for m in messages]
            for message in plain:
                for call in message.get("tool_calls") or []:
                    call["function"] = {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}
            return self._render_jinja(plain, [LEARN_TOOL], generation, variables)

    def _render_jinja(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        generation: bool = True,
        variables: dict[str, Any] | None = None,
    ) -> str:
        assert self.source is not None
        tools = [_template_tool(t) for t in tools] if tools else tools
        extra = {k: make(tools or []) for k, make in TEMPLATE_VARIABLES.items() if k in self._reads}
        for marker, shape in TOOL_SHAPES:
            if tools and marker in self.source:
                tools = shape(tools)
        return str(
            self._compiled.render(
                **{**extra, **(variables or {})},
                messages=messages,
                tools=tools,
                add_generation_prompt=generation,
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

        ``variables``: more template variables (``enable_thinking``, ``reasoning_effort``, ...), over the
        manifest's defaults; ``continue_final``: the last (assistant) message is left open, so the
        answer continues it.
        """
        requested = variables or {}
        variables = {**self.defaults, **requested}
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
        plain = [_template_message(m, reasoning_part=self._reasoning_part) for m in messages]
        if self._formatter is not None:
            if continue_final or requested:
                what = "continuing an assistant message" if continue_final else "template variables"
                raise bad_request(f"chat_format '{self.family}' does not support {what}", "messages")
            return self._render_format(plain)
        generation = not continue_final
        shown = (tools or None) if use_tools else None  # a named choice still shows the model every tool
        offered = [t for t in tools or [] if t["function"]["name"] == named] if named else (shown or [])
        try:
            try:
                plain = self._with_definitions(plain, shown)
                prompt = self._render_jinja(plain, shown, generation, variables)
            except TemplateRaised:
                raise
            except Exception:
                if plain == messages:
                    raise
                # a few templates (functionary) write the arguments as the string they came as
                prompt = self._render_jinja(
                    [_template_message(m, objects=False, reasoning_part=self._reasoning_part) for m in messages],
                    shown,
                    generation,
                    variables,
                )
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
        think_open = self.thinks and self._opens_reasoning(prompt)
        syntax = self.syntax or GENERIC
        grammar = None
        if use_tools and (choice == "required" or named):
            from deployer.runtime.chat.grammar import tool_grammar

            reasoning = syntax if self.thinks else replace(syntax, reasoning_open="", reasoning_close="")
            try:
                if self._schema_converter is None:
                    raise ValueError("no JSON-schema converter was given")
                converter = self._schema_converter()
            except ValueError as exc:
                raise bad_request(f"this server cannot force a tool call: {exc}", "tool_choice") from exc
            grammar = tool_grammar(converter, reasoning, offered, parallel_tool_calls and not named, think_open)
        stop = tuple(s for s in (self._eos, *syntax.stop) if s)
        harmony = syntax.layout == "harmony"
        spec = ParseSpec(
            syntax if use_tools else None,
            tuple(offered),
            parallel_tool_calls and not named,
            grammar is not None,
            self.thinks,
            think_open,
            self.reasoning,
            harmony,
        )
        add_bos = self._add_bos_token and bool(self._bos) and not prompt.startswith(self._bos)
        preserved = (
            *(syntax.markers if use_tools or harmony else ()),
            *(r for r in self.reasoning if r and self.thinks),
        )
        return RenderedChat(prompt, add_bos, stop, grammar, spec, tuple(dict.fromkeys(preserved)))

    def _with_definitions(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[dict[str, Any]]:
        """Messages with the tool definitions in the system message, for a template that writes calls but never
        shows the tools (DeepSeek V3.1): as llama.cpp's polyfill, the model reads them there."""
        if not tools or self.shows_tools or self.syntax is None:
            return messages
        example = write_calls(self.syntax, [("tool_name", {"argument": "value"})]).strip()
        listing = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        text = f"You can call these tools:\n{listing}\n\nTo call one, answer with:\n{example}"
        if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
            return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
        return [{"role": "system", "content": text}, *messages]

    def _opens_reasoning(self, prompt: str) -> bool:
        """The generation prompt leaves the reasoning open (the model starts inside it)."""
        opening, closing = self.reasoning
        tail = prompt.rstrip()
        if not opening:
            return bool(closing) and not tail.endswith(closing)
        return tail.endswith(opening)

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


def template_of(model: ModelInterface, config: RuntimeConfig) -> ChatTemplate | None:
    """The loaded model's chat formatting, as ``config`` asks (the engine's ``load_chat``)."""
    return ChatTemplate.load(
        template=model.metadata.get("tokenizer.chat_template"),
        chat_format=config.chat_format,
        bos_token=model.token_text(model.bos),
        eos_token=model.token_text(model.eos),
        reasoning_format=config.reasoning_format,
        thinking=config.thinking,
        formatter_of=model.chat_formatter,
        schema_converter=model.schema_converter,
    )


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


def _template_message(message: dict[str, Any], *, objects: bool = True, reasoning_part: bool = False) -> dict[str, Any]:
    """A message as chat templates read it: content present, call arguments as objects (as transformers
    documents them) unless ``objects`` is false; ``reasoning_part``: an assistant's ``reasoning_content`` as a
    content part of type "thinking" (the only place some templates read it)."""
    out = dict(message)
    if out.get("content") is None:  # templates test it as text ('</think>' in content, content + ...)
        refusal = out.get("refusal")
        out["content"] = refusal if isinstance(refusal, str) else ""
    reasoning = out.get("reasoning_content")
    if reasoning_part and out.get("role") == "assistant" and isinstance(reasoning, str) and reasoning:
        del out["reasoning_content"]
        content = out["content"]
        text = [{"type": "text", "text": content}] if isinstance(content, str) and content else []
        out["content"] = [
            {"type": "thinking", "thinking": reasoning},
            *(content if isinstance(content, list) else text),
        ]
    calls = out.get("tool_calls")
    if calls and objects:
        out["tool_calls"] = [_template_call(c) for c in calls]
    return out


def _template_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as templates read it: a description and parameters with properties, even where the request left
    them out (templates print ``tool.function.description`` and loop over ``parameters.properties``)."""
    function = tool.get("function")
    if not isinstance(function, dict):
        return tool
    parameters = function.get("parameters")
    parameters = dict(parameters) if isinstance(parameters, dict) else {"type": "object"}
    parameters.setdefault("properties", {})
    return {
        **tool,
        "function": {**function, "description": function.get("description") or "", "parameters": parameters},
    }


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):  # templates write the arguments with tojson: an object, as transformers expects
        with contextlib.suppress(json.JSONDecodeError):
            function["arguments"] = json.loads(arguments)
    return {**call, "function": function}
