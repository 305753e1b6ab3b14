"""Streaming retokenizer: one choice's text pieces -> Qwen3 token ids with char spans, exact w.r.t. whole-text encoding.

The upstream model's text arrives in arbitrary pieces (any split, any tokenizer). The guard must read exactly the ids
the Qwen3 chat template + tokenizer would give for the finished assistant turn, so ids are emitted only once no later
text can change them. Rendering after ``ChatRenderer.ASSISTANT_HEADER`` (which ends with ``<think>``), per the Qwen3
chat template (``docs/ARCHITECTURE.md``, "ChatRenderer")::

    "\\n" + reasoning.strip("\\n") + "\\n"  </think>  "\\n\\n" + content.lstrip("\\n")
    per tool call: ["\\n" if content or not the first call]  <tool_call>  '\\n{"name": "' NAME '", "arguments": ' ARGS '}\\n'  </tool_call>
    <|im_end|>

Control ids (``</think>`` 151668, ``<tool_call>`` 151657, ``</tool_call>`` 151658, ``<|im_end|>`` 151645) split the
text into segments that are encoded independently, like the tokenizer's added-token split. Within a segment, text is
NFC-normalised, split by the Qwen3 pre-tokenizer regex (the ``tokenizer.json`` of the Qwen3 checkpoints) and
BPE-encoded per pretoken. Two facts make a prefix final:

* NFC: text before a code point with ``ccc == 0`` and ``NFC_Quick_Check == Yes`` (a "boundary before" in UAX #15)
  normalises independently of what follows; the open cluster after the last such point is held back.
* Pre-tokenizer: a match ``[s, e)`` that is not the last one is final when the regex engine could not have looked
  past the text we have: for a match containing a non-whitespace char it looked at most at ``text[e]``; for a pure
  whitespace match (``\\s*[\\r\\n]+``, ``\\s+(?!\\S)``, ``\\s+``) it scanned the whole whitespace run starting at ``s``
  plus the char after it, so that run must already be terminated by a non-whitespace char. Whitespace is
  ``str.isspace`` (a superset of the regex engine's ``\\s``: conservative).

Char spans: ``TokenSpan.start/end`` are offsets in the choice's GLOBAL char offset space (Python ``str`` code points
of the original, pre-NFC text of every piece, concatenated in arrival order, ``"unmoderated"`` pieces included). A
character belongs to the token that holds its first UTF-8 byte; when NFC changes a cluster (a starter and the marks
that compose with it), its chars before the first change map 1:1 and the rest of the cluster belongs to the token
holding the first byte of the first changed normalised char (``"e" + U+0301`` -> the token of ``"é"``). A token
covers ``[start, end)`` = from its first to its last character (+1); tokens holding no client character (template
glue, the tool NAME, continuation bytes of a split character) have ``start == end`` at the end of the previous span.
Client characters that the template drops (the ``"\\n"``s stripped from the ends of the reasoning and from the start
of the content) and ``"unmoderated"`` pieces belong to no token. Spans are monotone and disjoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import regex
from tokenizers import Tokenizer

from guardproxy.guard.tokens import END_THINK, END_TOOL_CALL, IM_END, TOOL_CALL

__all__ = ["Retokenizer", "TokenSpan"]


#: Code points before which NFC may NOT cut the text (they can combine with / reorder against the previous char).
_NO_BOUNDARY_BEFORE = regex.compile(r"[\p{NFC_QC=N}\p{NFC_QC=M}\P{ccc=0}]")

Kind = Union[str, tuple]


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """One guard token: Qwen3 ``id`` and the global char range ``[start, end)`` of client text it covers."""

    id: int
    start: int
    end: int


def _boundary_before(c: str) -> bool:
    return c < "\x80" or _NO_BOUNDARY_BEFORE.match(c) is None


class Retokenizer:
    """Per-choice streaming retokenizer (see the module docstring for the rendering, exactness rule and spans).

    Args:
        tokenizer: a ``ChatRenderer`` (its ``.tokenizer``), a ``tokenizers.Tokenizer``, or a ``tokenizer.json`` path.
            Only its normalizer (NFC), pre-tokenizer and BPE model are used: added tokens are never matched in text.

    Usage: ``push(kind, text, name=...)`` for every piece in arrival order, then ``finish()``; both return the
    ``TokenSpan``s that became final, in template order. The concatenated ids equal the Qwen3 encoding of the
    rendered assistant turn after ``ASSISTANT_HEADER`` (through ``<|im_end|>``) when the pieces arrive in template
    order (reasoning, content, tool calls by first appearance). Out-of-order pieces (reasoning after content, content
    after a tool call, a piece of an earlier tool call) are rendered where they arrive, inside the current segment:
    still read by the guard, but no longer the template's rendering. A single pretoken longer than ``max_pending``
    chars (only adversarial text has one) is cut, which keeps memory and CPU bounded but breaks exactness there.
    """

    #: Longest uncommitted normalised text (chars) before the safety valve cuts it (bounds memory and CPU).
    max_pending = 4096

    def __init__(self, tokenizer):
        if hasattr(tokenizer, "tokenizer"):
            tokenizer = tokenizer.tokenizer
        if isinstance(tokenizer, (str, Path)):
            tokenizer = Tokenizer.from_str(Path(tokenizer).read_text(encoding="utf-8"))
        self._normalizer = tokenizer.normalizer
        self._pre = tokenizer.pre_tokenizer
        self._model = tokenizer.model
        self._offset = 0  # global chars pushed so far
        self._pos = 0  # end of the last emitted client span (glue tokens sit here)
        self._phase = "reasoning"  # -> "content" -> "tool"
        self._tools_seen: set = set()
        self._tool = None  # current tool index
        self._started = False  # a non-"\n" char of the current reasoning/content seen (strip rules)
        self._held: list[int] = []  # global offsets of held trailing reasoning "\n"s
        self._content_any = False  # any content char pushed (the template tests the raw content)
        self._raw: list[tuple[str, int | None]] = [("\n", None)]  # open NFC cluster(s) of the current segment
        self._norm: list[str] = []  # normalised, not yet committed text of the current segment
        self._attr: list[list[int]] = []  # per normalised char: global offsets it carries
        self._finished = False

    # ------------------------------------------------------------------ stats
    @property
    def offset(self) -> int:
        """Global chars pushed so far (end of the choice's moderated text)."""
        return self._offset

    @property
    def pending_chars(self) -> int:
        """Client chars pushed but not yet covered by an emitted token nor known to be dropped (held back)."""
        pend = sum(1 for _, o in self._raw if o is not None) + sum(len(a) for a in self._attr) + len(self._held)
        return pend

    # ------------------------------------------------------------------ input
    def push(self, kind: Kind, text: str, *, name: str | None = None) -> list[TokenSpan]:
        """Add one piece; returns the spans that became final.

        ``kind``: ``"reasoning"``, ``"content"``, ``("tool", index)`` (``name`` = the function name, used when the
        call's first piece arrives) or ``"unmoderated"`` (occupies global offsets, is not rendered).
        Raises ``RuntimeError`` after ``finish()`` and ``ValueError`` for an unknown kind.
        """
        if self._finished:
            raise RuntimeError("push() after finish()")
        start, self._offset = self._offset, self._offset + len(text)
        if kind == "unmoderated" or not text:
            return []
        out: list[TokenSpan] = []
        offs = range(start, start + len(text))
        if kind == "reasoning" and self._phase == "reasoning":
            self._reasoning(text, offs)
        elif kind == "content" and self._phase in ("reasoning", "content"):
            if self._phase == "reasoning":
                out += self._end_reasoning()
            self._content_any = True
            for c, o in zip(text, offs):
                if not self._started and c == "\n":
                    continue  # content.lstrip("\n")
                self._started = True
                self._raw.append((c, o))
        elif isinstance(kind, tuple) and len(kind) == 2 and kind[0] == "tool" and kind[1] not in self._tools_seen:
            out += self._open_tool(kind[1], name)
            self._raw.extend(zip(text, offs))
        elif kind in ("reasoning", "content") or (isinstance(kind, tuple) and kind[:1] == ("tool",)):
            self._raw.extend(zip(text, offs))  # out of template order: rendered where it arrives
        else:
            raise ValueError(f"unknown piece kind {kind!r}")
        return out + self._commit(final=False)

    def finish(self) -> list[TokenSpan]:
        """End of the choice: flush everything and close the turn with ``<|im_end|>`` (151645). Idempotent."""
        if self._finished:
            return []
        out: list[TokenSpan] = []
        if self._phase == "reasoning":
            out += self._end_reasoning()
        if self._phase == "tool":
            out += self._close_tool()
        out += self._commit(final=True)
        self._finished = True
        return out + [self._glue(IM_END)]

    # ------------------------------------------------------------------ template glue
    def _reasoning(self, text: str, offs) -> None:
        for c, o in zip(text, offs):
            if c == "\n":
                if self._started:
                    self._held.append(o)  # maybe trailing: decided by the next reasoning char or the end
                continue  # leading: reasoning.strip("\n")
            self._started = True
            self._raw.extend(("\n", h) for h in self._held)
            self._held = []
            self._raw.append((c, o))

    def _end_reasoning(self) -> list[TokenSpan]:
        self._held = []  # trailing "\n"s are stripped
        self._raw.append(("\n", None))
        out = self._commit(final=True) + [self._glue(END_THINK)]
        self._phase, self._started = "content", False
        self._raw.extend(("\n", None) for _ in range(2))
        return out

    def _open_tool(self, index, name: str | None) -> list[TokenSpan]:
        out: list[TokenSpan] = []
        if self._phase == "reasoning":
            out += self._end_reasoning()
        if self._phase == "content":
            if self._content_any:
                self._raw.append(("\n", None))
        else:
            out += self._close_tool()
            self._raw.append(("\n", None))
        out += self._commit(final=True) + [self._glue(TOOL_CALL)]
        self._phase, self._tool = "tool", index
        self._tools_seen.add(index)
        self._raw.extend((c, None) for c in '\n{"name": "' + (name or "") + '", "arguments": ')
        return out

    def _close_tool(self) -> list[TokenSpan]:
        self._raw.extend((c, None) for c in "}\n")
        return self._commit(final=True) + [self._glue(END_TOOL_CALL)]

    def _glue(self, tid: int) -> TokenSpan:
        return TokenSpan(tid, self._pos, self._pos)

    # ------------------------------------------------------------------ exact incremental encoding
    def _normalize_raw(self, final: bool) -> None:
        """Move complete NFC clusters from ``_raw`` to ``_norm``/``_attr`` (all of them when ``final``)."""
        raw = self._raw
        cut = len(raw)
        if not final:
            cut = 0
            for j in range(len(raw) - 1, 0, -1):
                if _boundary_before(raw[j][0]):
                    cut = j
                    break
        if cut == 0:
            return
        i = 0
        while i < cut:
            j = i + 1
            while j < cut and not _boundary_before(raw[j][0]):
                j += 1
            cluster = "".join(c for c, _ in raw[i:j])
            normed = cluster if (j == i + 1 and _boundary_before(cluster)) else self._normalizer.normalize_str(cluster)
            if normed == cluster:
                self._norm.extend(cluster)
                self._attr.extend([o] if o is not None else [] for _, o in raw[i:j])
            else:  # chars before the first change map 1:1; the rest of the cluster goes to the next char
                same = 0
                while same < min(len(cluster), len(normed)) - 1 and cluster[same] == normed[same]:
                    same += 1
                self._norm.extend(normed)
                self._attr.extend([o] if o is not None else [] for _, o in raw[i:i + same])
                self._attr.append([o for _, o in raw[i + same:j] if o is not None])
                self._attr.extend([] for _ in normed[same + 1:])
            i = j
        del raw[:cut]

    def _commit(self, final: bool) -> list[TokenSpan]:
        """Emit the ids of every final pretoken of the current segment (all of them when ``final``)."""
        self._normalize_raw(final)
        if not self._norm:
            return []
        text = "".join(self._norm)
        # Look-ahead char: the first char of the open NFC cluster. NFC may still compose it with marks that follow,
        # but a canonical composition never changes its class (letter / number / whitespace / other; checked over
        # all of Unicode), which is all the regex decides on at a match's horizon.
        ahead = "" if final or not self._raw else self._raw[0][0]
        seen = text + ahead
        pretokens = self._pre.pre_tokenize_str(seen)
        n = len(seen)
        upto = 0  # normalised chars whose pretokens are final
        if final:
            upto = n
        else:
            for _, (s, e) in pretokens[:-1]:
                if e > len(text):
                    break
                horizon = e
                if seen[s:e].isspace():  # pure whitespace match: needs the whole run + the char after it
                    horizon = s
                    while horizon < n and seen[horizon].isspace():
                        horizon += 1
                if horizon >= n:
                    break
                upto = e
        if upto == 0 and len(text) > self.max_pending:
            # Safety valve (adversarial input: one pretoken longer than max_pending chars, e.g. a huge whitespace run
            # or letter run): cut it, keeping a tail. Still a valid encoding of the same text, not the canonical one.
            upto = len(text) - self.max_pending // 2
            pretokens = self._pre.pre_tokenize_str(text[:upto])
        if upto == 0:
            return []
        out: list[TokenSpan] = []
        for piece, (s, e) in pretokens:
            if e > upto:
                break
            out += self._encode_pretoken(piece, text[s:e], self._attr[s:e])
        del self._norm[:upto], self._attr[:upto]
        return out

    def _encode_pretoken(self, bytelevel: str, chars: str, attr: list[list[int]]) -> list[TokenSpan]:
        """BPE one pretoken; each char's offsets go to the token holding its first UTF-8 byte."""
        first_byte_owner: dict[int, list[int]] = {}  # byte position -> offsets of the char starting there
        b = 0
        for c, a in zip(chars, attr):
            first_byte_owner[b] = a
            b += len(c.encode("utf-8"))
        out: list[TokenSpan] = []
        b = 0
        for tok in self._model.tokenize(bytelevel):
            nb = len(tok.value)  # one byte-level char per original byte
            covered = [o for p in range(b, b + nb) for o in first_byte_owner.get(p, ())]
            b += nb
            if covered:
                start, end = min(covered), max(covered) + 1
                self._pos = end
                out.append(TokenSpan(tok.id, start, end))
            else:
                out.append(self._glue(tok.id))
        return out

