"""GBNF that forces tool calls in the model's own syntax (``tool_choice`` "required" or a named function).

The grammar writes exactly what :func:`deployer.runtime.chat.families.write_calls` writes, with each
tool's arguments constrained by its JSON schema (llama-cpp-python's converter), so the parser reads
back every call the grammar lets through.
"""

from __future__ import annotations

import json
from typing import Any

from deployer.runtime.chat.families import Syntax, closing, json_core
from deployer.runtime.chat.scan import ID_HOLE
from deployer.runtime.errors import bad_request

_ARGS = "\x00"  # where the arguments rule goes in a call's text


def gbnf_literal(text: str) -> str:
    """A GBNF string literal ("" for none)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return '"' + escaped.replace("\t", "\\t") + '"'


def _seq(text: str, id_rule: str, index_rule: str = "") -> str:
    """GBNF of a marker text: literals, the id hole as ``id_rule``, an index digit as ``index_rule``."""
    parts: list[str] = []
    for i, chunk in enumerate(text.split(ID_HOLE)):
        if i:
            parts.append(id_rule)
        if index_rule and "0" in chunk:
            head, tail = chunk.split("0", 1)
            parts += [gbnf_literal(head) if head else "", index_rule, gbnf_literal(tail) if tail else ""]
        elif chunk:
            parts.append(gbnf_literal(chunk))
    return " ".join(p for p in parts if p)


def _text_rule(value_close: str, spec: dict[str, Any]) -> str:
    """Free text of a string value: anything but the first character of its closing marker (at most maxLength)."""
    stop = (value_close.strip() or "<")[0]
    escaped = stop.replace("\\", "\\\\").replace("]", "\\]").replace("^", "\\^").replace("-", "\\-")
    most = spec.get("maxLength")
    return f"[^{escaped}]{{0,{most}}}" if isinstance(most, int) and most >= 0 else f"[^{escaped}]*"


def tool_grammar(
    converter: Any, syntax: Syntax, tools: list[dict[str, Any]], parallel: bool, think_opened: bool
) -> str:
    """GBNF: one (or, when ``parallel``, one or more) calls of ``tools`` in ``syntax``.

    ``converter``: a fresh JSON-schema-to-GBNF converter (llama.cpp's SchemaConverter, from the model
    interface): the argument rules are its, the call syntax around them is ours.
    """
    converter._add_rule("tc-id", f"[a-zA-Z0-9]{{{syntax.call_id_length}}}")
    converter._add_rule("tc-index", "[0-9]+")
    alternatives = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = function.get("parameters") or {"type": "object", "properties": {}}
        try:
            resolved = converter.resolve_refs(schema, f"tool-{i}")
            args_rule = converter.visit(resolved, f"tc-args-{i}")
            alternatives.append(_core(converter, syntax, function["name"], resolved, args_rule, i))
        except Exception as exc:  # the converter raises plain exceptions on schemas it cannot express
            raise bad_request(
                f"the parameters schema of tool '{function['name']}' cannot be turned into a grammar: {exc}", "tools"
            ) from exc
    call = " ".join(p for p in (_seq(syntax.call_open, "tc-id"), "tc-core", _seq(syntax.call_close, "tc-id")) if p)
    more = f"( {_seq(syntax.separator, 'tc-id') or ''} tc-call )*" if parallel and syntax.layout != "harmony" else ""
    calls = " ".join(
        p for p in (_seq(syntax.block_open, "tc-id"), "tc-call", more, _seq(syntax.block_close, "tc-id")) if p
    )
    # llama-cpp-python's JSON string lets raw control characters through, which no JSON parser takes back
    grammar = converter.format_grammar().replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x00-\\x1F\\x7F] |')
    rules = [grammar, f"tc-core ::= {' | '.join(alternatives)}", f"tc-call ::= {call}"]
    rules.append(f"tc-calls ::= {calls}")
    close = gbnf_literal(syntax.reasoning_close) if syntax.reasoning_close else ""
    if syntax.layout == "harmony":
        rules.append(f"root ::= ( {gbnf_literal('<|channel|>analysis<|message|>')} [^<]* {close} "
                     f"{gbnf_literal('<|start|>assistant')} )? tc-calls")  # fmt: skip
    elif think_opened and close:  # the prompt opened the reasoning: the model reasons first, then calls
        rules.append(f"root ::= [^<]* {close} [ \\t\\n]* tc-calls")
    elif close and syntax.reasoning_open:
        rules.append(f"root ::= ( {gbnf_literal(syntax.reasoning_open)} [^<]* {close} [ \\t\\n]* )? tc-calls")
    else:
        rules.append("root ::= tc-calls")
    return "\n".join(rules) + "\n"


def _core(converter: Any, syntax: Syntax, name: str, schema: dict[str, Any], args_rule: str, i: int) -> str:
    if syntax.layout == "harmony":
        return f"{gbnf_literal(f'<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>')} {args_rule}"
    if syntax.layout == "json":
        before, after = json_core(syntax, json.dumps(name), _ARGS).split(_ARGS)
        return " ".join(p for p in (gbnf_literal(before), args_rule, gbnf_literal(after) if after else "") if p)
    suffix = _seq(syntax.name_suffix, "tc-id", "tc-index" if syntax.indexed else "")
    head = f"{gbnf_literal(name)} {suffix}".strip()
    if syntax.layout == "name-json":
        return f"{head} {args_rule}"
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    parts = [head]
    for j, (key, spec) in enumerate(properties.items()):
        is_text = isinstance(spec, dict) and spec.get("type") == "string" and not spec.get("enum")
        if is_text:
            text_rule = converter._add_rule(f"tc-text-{i}-{j}", _text_rule(syntax.value_close, spec))
            param = f"{gbnf_literal(syntax.key_open + key + syntax.key_close)} {text_rule}"
            close = closing(syntax.value_close, key)
        else:
            value = converter.visit(spec if isinstance(spec, dict) else {}, f"tc-{i}-{j}")
            param = f"{gbnf_literal(syntax.key_open + key + syntax.key_close_json)} {value}"
            close = closing(syntax.value_close_json, key)
        if close:
            param += f" {gbnf_literal(close)}"
        if j and syntax.param_separator:
            param = f"{gbnf_literal(syntax.param_separator)} {param}"
        parts.append(param if key in required else f"( {param} )?")
    return " ".join(parts)
