"""gpt-oss's Harmony format read back: channels say what is reasoning, text, or a call.

``<|channel|>analysis<|message|>...<|end|>`` is reasoning; a header naming ``to=functions.NAME`` (in the
channel header, or in the role header before it) a call whose message is the arguments; any other
channel text. Same contract as :func:`deployer.runtime.chat.scan.scan`.
"""

from __future__ import annotations

import re

from deployer.runtime.chat.families import Syntax
from deployer.runtime.chat.scan import CallScan, Memo, Reasoning, Scan, Scanned, Unit, held_back

_HARMONY_ENDS = ("<|end|>", "<|call|>", "<|return|>")
_RECIPIENT = re.compile(r"to=functions\.([A-Za-z0-9_.\-]+)")


def scan_harmony(syntax: Syntax, buf: str, pos: int, fresh: bool, final: bool, memo: Memo) -> Scan:
    """gpt-oss: ``<|channel|>analysis<|message|>...<|end|>`` is reasoning, a header naming ``to=functions.NAME``
    a call (its message the arguments), any other channel text."""
    pieces: list[Scanned] = []
    while True:
        k = buf.find("<|channel|>", pos)
        if k < 0:
            end = len(buf) if final else len(buf) - held_back(buf[pos:], ("<|channel|>", "<|start|>", "to=functions."))
            header = max(buf.rfind("<|start|>", pos), buf.rfind("to=functions.", pos))
            if header >= 0 and not final:  # a header whose channel is still to come
                while header > pos and buf[header - 1].isspace():
                    header -= 1
                end = min(end, header)
            if end > pos:
                pieces.append(buf[pos:end])
            return pieces, None, max(end, pos), fresh
        # the header before the channel: <|start|>assistant, and a recipient may be in it
        lead = re.search(r"(<\|start\|>assistant[^<]*|\s*to=functions\.[^<]*)$", buf[pos:k])
        before = lead.start() + pos if lead else k
        if before > pos:
            pieces.append(buf[pos:before])
        head_end = buf.find("<|message|>", k)
        ends = [e for e in (buf.find(m, head_end) for m in _HARMONY_ENDS) if e >= 0] if head_end >= 0 else []
        if not ends and not final:
            partial = Unit([], buf[before:], False)
            if head_end >= 0 and (recipient := _RECIPIENT.search(buf, before, head_end)):
                body = buf[head_end + len("<|message|>") :]
                body = body[: len(body) - held_back(body, _HARMONY_ENDS)]  # an end marker half written
                partial.calls = [CallScan(recipient[1], body.strip() or None)]
            return pieces, partial, before, fresh
        body_end = min(ends) if ends else len(buf)
        stop = body_end + next((len(m) for m in _HARMONY_ENDS if buf.startswith(m, body_end)), 0)
        if head_end < 0:
            pieces.append(buf[before:stop])
        else:
            header, body = buf[before:head_end], buf[head_end + len("<|message|>") : body_end]
            recipient = _RECIPIENT.search(header)
            if recipient:
                pieces.append(Unit([CallScan(recipient[1], body.strip(), True)], buf[before:stop], True))
            elif "<|channel|>analysis" in header:
                pieces.append(Reasoning(body))
            else:
                pieces.append(body)
        pos = stop
