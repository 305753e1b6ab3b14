"""Upstream chunks as the proxy reads them: validation and normalisation before anything is relayed.

:func:`normalize_chunk` makes every client-visible text of a ``chat.completion.chunk`` / ``text_completion`` chunk
(or of a non-streamed completion) a string, or refuses the chunk (:class:`BadChunk`): data the guard cannot read is
never relayed raw.
"""

from __future__ import annotations

from guardproxy.wire.jsonio import dumps

__all__ = ["BadChunk", "normalize_chunk"]

#: Text-bearing keys of an OpenRouter ``reasoning_details`` item (``reasoning.text`` / ``reasoning.summary``).
DETAIL_TEXT_FIELDS = ("text", "summary")


class BadChunk(ValueError):
    """A chunk the proxy cannot moderate: ``choices`` not a list of objects, a choice ``index`` outside ``[0, n)``,
    or a text container (``delta``, ``tool_calls``, ``function``, ``reasoning_details``) of the wrong type."""


#: Text fields of a choice / delta that a client shows; non-string values are moderated as their JSON text.
_DELTA_TEXT = ("content", "refusal", "reasoning_content", "reasoning")


def normalize_chunk(obj: dict, n: int, *, stream: bool = False) -> bool:
    """Make every client-visible text of a chunk (or of a non-streamed completion: ``message`` instead of
    ``delta``) a string, in place, so that nothing reaches the client unread.

    * in a stream (``stream=True``), a choice that carries ``message`` instead of ``delta`` has it renamed to
      ``delta``: the splitter reads deltas only, and a raw client must not see unread text;
    * ``choices: null`` becomes ``[]``; a missing/null choice ``index`` becomes its list position;
    * a non-string, non-null text value (``content`` as number/list/object, tool ``arguments`` sent as a JSON
      object, ...) becomes its compact JSON text, which is what the guard reads and the client receives.

    Args:
        obj: a parsed chunk (``dict``).
        n: the number of choices requested; indices must lie in ``[0, n)``.
    Returns:
        True if ``obj`` was changed (re-serialise it instead of relaying the original bytes).
    Raises:
        BadChunk: see the class.
    """
    changed = False
    if "choices" not in obj:
        return False
    choices = obj["choices"]
    if choices is None:
        obj["choices"] = []
        return True
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise BadChunk("'choices' is not an array of objects")
    for j, ch in enumerate(choices):
        idx = ch.get("index")
        if idx is None:
            ch["index"] = idx = j
            changed = True
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < n:
            raise BadChunk(f"choice index {idx!r} is outside [0, {n})")
        changed |= _stringify(ch, ("text",))
        if stream and "delta" not in ch and "message" in ch:
            ch["delta"] = ch.pop("message")
            changed = True
        key = "delta" if "delta" in ch else "message"
        delta = ch.get(key)
        if delta is None:
            continue
        if not isinstance(delta, dict):
            raise BadChunk(f"'{key}' is not an object")
        changed |= _stringify(delta, _DELTA_TEXT)
        for item in _items(delta, "reasoning_details"):
            changed |= _stringify(item, DETAIL_TEXT_FIELDS)
        for item in _items(delta, "tool_calls"):
            fn = item.get("function")
            if fn is None:
                continue
            if not isinstance(fn, dict):
                raise BadChunk("'tool_calls[].function' is not an object")
            changed |= _stringify(fn, ("arguments",))
    return changed


def _items(delta: dict, key: str) -> list[dict]:
    items = delta.get(key)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise BadChunk(f"'{key}' is not an array of objects")
    return items


def _stringify(d: dict, keys: tuple[str, ...]) -> bool:
    changed = False
    for k in keys:
        v = d.get(k)
        if v is not None and not isinstance(v, str):
            d[k] = dumps(v).decode()
            changed = True
    return changed
