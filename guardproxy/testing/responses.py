"""Responses API streams for tests: build one from a short description (:func:`response_events`), frame it
(:func:`sse`), and read back what a client reassembles from the events it received (:func:`reassemble`).

The events follow OpenAI's sequence (``tests/fixtures/responses/README.md``): ``response.created``,
``response.in_progress``, per item ``output_item.added``, its part events, the deltas, the ``*.done`` events and
``output_item.done``, then ``response.completed`` with the whole output.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["reassemble", "response_events", "sse", "unparsed"]


def _message(oi: int, spec: dict) -> tuple[list[tuple[str, dict]], dict]:
    mid, refusal = f"msg_{oi}", spec["type"] == "refusal"
    kind, key, delta_type = ("refusal", "refusal", "refusal") if refusal else ("output_text", "text", "output_text")
    empty = {"type": kind, key: ""} if refusal else {"type": kind, "annotations": [], "logprobs": [], "text": ""}
    text = "".join(spec["deltas"])
    part = {**empty, key: text}
    item = {"id": mid, "type": "message", "status": "completed", "content": [part], "role": "assistant"}
    evs = [("response.output_item.added", {"output_index": oi, "item": {**item, "status": "in_progress",
                                                                          "content": []}}),
           ("response.content_part.added", {"item_id": mid, "output_index": oi, "content_index": 0, "part": empty})]
    evs += [(f"response.{delta_type}.delta", {"item_id": mid, "output_index": oi, "content_index": 0, "delta": d})
            for d in spec["deltas"]]
    evs += [(f"response.{delta_type}.done", {"item_id": mid, "output_index": oi, "content_index": 0, key: text}),
            ("response.content_part.done", {"item_id": mid, "output_index": oi, "content_index": 0, "part": part}),
            ("response.output_item.done", {"output_index": oi, "item": item})]
    return evs, item


def _reasoning(oi: int, spec: dict) -> tuple[list[tuple[str, dict]], dict]:
    rid, text = f"rs_{oi}", "".join(spec["deltas"])
    item = {"id": rid, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}]}
    base = {"item_id": rid, "output_index": oi, "summary_index": 0}
    evs = [("response.output_item.added", {"output_index": oi, "item": {**item, "summary": []}}),
           ("response.reasoning_summary_part.added", {**base, "part": {"type": "summary_text", "text": ""}})]
    evs += [("response.reasoning_summary_text.delta", {**base, "delta": d}) for d in spec["deltas"]]
    evs += [("response.reasoning_summary_text.done", {**base, "text": text}),
            ("response.reasoning_summary_part.done", {**base, "part": {"type": "summary_text", "text": text}}),
            ("response.output_item.done", {"output_index": oi, "item": item})]
    return evs, item


def _function_call(oi: int, spec: dict) -> tuple[list[tuple[str, dict]], dict]:
    fid, args = f"fc_{oi}", "".join(spec["deltas"])
    item = {"id": fid, "type": "function_call", "status": "completed", "arguments": args, "call_id": f"call_{oi}",
            "name": spec.get("name", "lookup")}
    evs = [("response.output_item.added", {"output_index": oi, "item": {**item, "status": "in_progress",
                                                                          "arguments": ""}})]
    evs += [("response.function_call_arguments.delta", {"item_id": fid, "output_index": oi, "delta": d})
            for d in spec["deltas"]]
    evs += [("response.function_call_arguments.done", {"item_id": fid, "output_index": oi, "arguments": args}),
            ("response.output_item.done", {"output_index": oi, "item": item})]
    return evs, item


_ITEMS = {"message": _message, "refusal": _message, "reasoning": _reasoning, "function_call": _function_call}


def response_events(items: list[dict], *, rid: str = "resp_test", model: str = "fake-model",
                    end: str = "response.completed") -> list[dict]:
    """The events of a streamed response whose output items are described by ``items``: each
    ``{"type": "message" | "refusal" | "reasoning" | "function_call", "deltas": [str, ...], "name": ...}``.
    ``end``: the terminal event type, or None for a stream that just stops. Numbered from 0."""
    resp = {"id": rid, "object": "response", "created_at": 1761000000, "status": "in_progress", "model": model,
            "output": [], "usage": None}
    evs: list[tuple[str, dict]] = [("response.created", {"response": resp}), ("response.in_progress",
                                                                              {"response": resp})]
    output = []
    for oi, spec in enumerate(items):
        more, item = _ITEMS[spec["type"]](oi, spec)
        evs += more
        output.append(item)
    if end is not None:
        status = {"response.completed": "completed", "response.incomplete": "incomplete"}.get(end, "failed")
        evs.append((end, {"response": {**resp, "status": status, "output": output,
                                       "usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}}}))
    return [{"type": t, "sequence_number": n, **fields} for n, (t, fields) in enumerate(evs)]


def sse(events: list[dict]) -> bytes:
    """Events framed as OpenAI sends them: ``event: TYPE``, ``data: JSON``, a blank line each."""
    return b"".join(f"event: {e.get('type')}\ndata: {json.dumps(e, ensure_ascii=False)}\n\n".encode()
                    for e in events)


def reassemble(events: list[Any]) -> dict:
    """What a client reassembles from the events it received (dicts; ``"[DONE]"`` and others skipped).

    Returns ``{"deltas": {slot: text}, "done": {slot: text}, "parts": {slot: text}, "items": {oi: item},
    "final": the terminal event's response or None, "terminal": its type, "errors": [error events],
    "seq": [sequence numbers]}``; a slot is ``(output_index, "content" | "summary" | "args", index)``.
    """
    out: dict[str, Any] = {"deltas": {}, "done": {}, "parts": {}, "items": {}, "final": None, "terminal": None,
                           "errors": [], "seq": []}
    for e in events:
        if not isinstance(e, dict):
            continue
        if "sequence_number" in e:
            out["seq"].append(e["sequence_number"])
        t = e.get("type") or ""
        oi = e.get("output_index")
        part = "summary" if "summary" in t else "args" if "function_call" in t else "content"
        slot = (oi, part, e.get("summary_index" if part == "summary" else "content_index", 0) if part != "args" else 0)
        if t.endswith(".delta"):
            out["deltas"][slot] = out["deltas"].get(slot, "") + e["delta"]
        elif t.endswith("_text.done") or t.endswith("refusal.done") or t.endswith("arguments.done"):
            out["done"][slot] = e.get("text", e.get("refusal", e.get("arguments")))
        elif t.endswith("part.done"):
            out["parts"][slot] = e["part"].get("text", e["part"].get("refusal"))
        elif t == "response.output_item.done":
            out["items"][oi] = e["item"]
        elif t in ("response.completed", "response.incomplete", "response.failed"):
            out["final"], out["terminal"] = e["response"], t
        elif t == "error" or e.get("error"):
            out["errors"].append(e)
    return out


def unparsed(value: Any) -> Any:
    """An SDK object's JSON (Python ``to_dict()``, Node's objects) without the fields the SDKs' parsing helpers add
    to output items (``parsed``, ``parsed_arguments``), for comparing with what the upstream sent."""
    if isinstance(value, dict):
        return {k: unparsed(v) for k, v in value.items() if k not in ("parsed", "parsed_arguments")}
    return [unparsed(v) for v in value] if isinstance(value, list) else value
