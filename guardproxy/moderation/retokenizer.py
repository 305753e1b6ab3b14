"""Streaming retokenizer: one choice's text pieces -> Qwen3 token ids with char spans, exact w.r.t. whole-text encoding.

The upstream model's text arrives in arbitrary pieces (any split, any tokenizer). The guard must read exactly the ids
the Qwen3 chat template + tokenizer would give for the finished assistant turn, so ids are emitted only once no later
text can change them. Rendering after ``ChatRenderer.ASSISTANT_HEADER`` (which ends with ``<think>``), per the Qwen3
chat template (``docs/ARCHITECTURE.md``, "ChatRenderer")::

    "\\n" + reasoning.strip("\\n") + "\\n"  </think>  "\\n\\n" + content.lstrip("\\n")
    per tool call: ["\\n" if content or not the first call]  <tool_call>  '\\n{"name": "' NAME '", "arguments": ' ARGS '}\\n'  </tool_call>
    <|im_end|>

where every client text is read through the guard's view (:mod:`guardproxy.guard.normalize`): ``reasoning``,
``content`` and ``NAME`` are ``view(text)``, ``ARGS`` is ``view(decoded)`` with ``decoded`` the argument text with
its JSON string escapes decoded (:class:`~guardproxy.guard.normalize.JsonStringDecoder`). The strip rules apply to
the view (a removed char before a leading ``"\\n"`` does not keep it), and the ``"\\n"`` before the first tool call
appears when the content's view is not empty. So the ids equal the real template and tokenizer applied to the
message with each of its client texts replaced by its view.

Control ids (``</think>`` 151668, ``<tool_call>`` 151657, ``</tool_call>`` 151658, ``<|im_end|>`` 151645) split the
text into segments that are encoded independently, like the tokenizer's added-token split. Within a segment, chars
are folded as they arrive (:func:`~guardproxy.guard.normalize.view_chars`: REMOVED ones dropped, FOLDED ones
replaced by their NFKC), the result is NFC-normalised (the tokenizer's normaliser), split by the Qwen3 pre-tokenizer
regex (the ``tokenizer.json`` of the Qwen3 checkpoints) and BPE-encoded per pretoken. Facts that make a prefix
final:

* NFC: text before a char where :func:`~guardproxy.guard.normalize.boundary_before` holds (``ccc == 0`` and
  ``NFC_Quick_Check == Yes``, a "boundary before" in UAX #15) normalises independently of what follows; the open
  cluster after the last such char is held back.
* JSON escapes: the raw chars of an escape not complete yet (``\\``, ``\\u00``, a high surrogate before its low half)
  are held until it completes or the call ends.
* Pre-tokenizer: a match ``[s, e)`` that is not the last one is final when the regex engine could not have looked
  past the text we have: for a match containing a non-whitespace char it looked at most at ``text[e]``; for a pure
  whitespace match (``\\s*[\\r\\n]+``, ``\\s+(?!\\S)``, ``\\s+``) it scanned the whole whitespace run starting at ``s``
  plus the char after it, so that run must already be terminated by a non-whitespace char. Whitespace is
  ``str.isspace`` (a superset of the regex engine's ``\\s``: conservative).

Char spans: ``TokenSpan.start/end`` are offsets in the choice's GLOBAL char offset space (Python ``str`` code points
of the original text of every piece, as the client receives it, concatenated in arrival order, ``"unmoderated"``
pieces included). Each char the guard reads carries the client chars it came from: a plain char itself; a decoded
JSON escape all the raw chars of the escape (``\\u007a`` -> six chars; a surrogate pair twelve); a folded char,
every char of its fold (``"ﬁ"`` -> ``"f"`` and ``"i"``, both carrying the ligature); a cluster that NFC changes as a
whole (a starter and marks that compose with it), its chars before the first change 1:1 and the rest to the first
changed normalised char (``"e" + U+0301`` -> the token of ``"é"``). A token covers
``[start, end)`` = from the first to the last client char (+1) of the chars it holds a UTF-8 byte of (a char whose
bytes two tokens split belongs to both); tokens holding no client character (template glue, the tool NAME) have
``start == end`` at the end of the previous span. REMOVED chars belong to no token: one between two chars of a token
lies inside its span, one between two tokens between their spans (a redaction of both covers it). Client characters
that the template drops (the ``"\\n"``s stripped from the ends of the reasoning and from the start of the content)
and ``"unmoderated"`` pieces belong to no token either. Starts and ends are non-decreasing; two spans overlap only on
a char that the tokens split between them (its UTF-8 bytes, or the chars of its fold).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from tokenizers import Tokenizer

from guardproxy.guard.normalize import JsonStringDecoder, Sourced, boundary_before, view_chars
from guardproxy.guard.tokens import END_THINK, END_TOOL_CALL, IM_END, TOOL_CALL

__all__ = ["Retokenizer", "TokenSpan"]

Kind = Union[str, tuple]


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """One guard token: Qwen3 ``id`` and the global char range ``[start, end)`` of client text it covers."""

    id: int
    start: int
    end: int


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
    still read by the guard, but no longer the template's rendering. A single pretoken or normalisation cluster
    longer than ``max_pending`` chars (only adversarial text has one: thousands of letters or combining marks in a
    row) is cut, which keeps memory and CPU bounded but breaks exactness there.
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
        self._json: dict = {}  # tool index -> JsonStringDecoder of its arguments
        self._started = False  # a non-"\n" char of the current reasoning/content's view seen (strip rules)
        self._held: list[tuple[int, ...]] = []  # offsets of held trailing reasoning "\n"s
        self._content_any = False  # the content's view is not empty (the template tests the unstripped content)
        self._raw: list[Sourced] = [("\n", ())]  # open normalisation cluster(s) of the current segment
        self._norm: list[str] = []  # normalised, not yet committed text of the current segment
        self._attr: list[tuple[int, ...]] = []  # per normalised char: global offsets it carries
        self._finished = False

    # ------------------------------------------------------------------ stats
    @property
    def offset(self) -> int:
        """Global chars pushed so far (end of the choice's moderated text)."""
        return self._offset

    @property
    def pending_chars(self) -> int:
        """Client chars pushed but not yet covered by an emitted token nor known to be dropped (held back)."""
        held = {o for _, a in self._raw for o in a}.union(*self._attr, *self._held)
        for decoder in self._json.values():
            held.update(decoder.pending)
        return sum(1 for o in held if o >= self._pos)

    # ------------------------------------------------------------------ input
    def push(self, kind: Kind, text: str, *, name: str | None = None) -> list[TokenSpan]:
        """Add one piece; returns the spans that became final.

        ``kind``: ``"reasoning"``, ``"content"``, ``("tool", key)`` (one tool call per ``key``, e.g. its index;
        ``name`` = the function name, used when the call's first piece arrives) or ``"unmoderated"`` (occupies
        global offsets, is not rendered). Raises ``RuntimeError`` after ``finish()`` and ``ValueError`` for an
        unknown kind.
        """
        if self._finished:
            raise RuntimeError("push() after finish()")
        start, self._offset = self._offset, self._offset + len(text)
        if kind == "unmoderated" or not text:
            return []
        tool = isinstance(kind, tuple) and len(kind) == 2 and kind[0] == "tool"
        if not tool and kind not in ("reasoning", "content"):
            raise ValueError(f"unknown piece kind {kind!r}")
        out: list[TokenSpan] = []
        if tool:
            if kind[1] not in self._tools_seen:
                out += self._open_tool(kind[1], name)
            chars = self._json.setdefault(kind[1], JsonStringDecoder()).feed(text, start)
        else:
            chars = [(c, (o,)) for o, c in enumerate(text, start)]
        chars = view_chars(chars)
        if kind == "reasoning" and self._phase == "reasoning":
            self._reasoning(chars)
        elif kind == "content" and self._phase in ("reasoning", "content"):
            if self._phase == "reasoning":
                out += self._end_reasoning()
            self._content(chars)
        else:
            self._raw.extend(chars)  # a tool call's arguments, or text out of template order: rendered where it arrives
        return out + self._commit(final=False)

    def finish(self) -> list[TokenSpan]:
        """End of the choice: flush everything and close the turn with ``<|im_end|>`` (151645). Idempotent."""
        if self._finished:
            return []
        out: list[TokenSpan] = []
        if self._phase == "reasoning":
            out += self._end_reasoning()
        for key in list(self._json):
            self._flush_json(key)
        if self._phase == "tool":
            out += self._close_tool()
        out += self._commit(final=True)
        self._finished = True
        return out + [self._glue(IM_END)]

    # ------------------------------------------------------------------ template glue
    def _reasoning(self, chars: list[Sourced]) -> None:
        for c, a in chars:
            if c == "\n":
                if self._started:
                    self._held.append(a)  # maybe trailing: decided by the next reasoning char or the end
                continue  # leading: reasoning.strip("\n")
            self._started = True
            self._raw.extend(("\n", h) for h in self._held)
            self._held = []
            self._raw.append((c, a))

    def _content(self, chars: list[Sourced]) -> None:
        self._content_any = self._content_any or bool(chars)
        for c, a in chars:
            if not self._started and c == "\n":
                continue  # content.lstrip("\n")
            self._started = True
            self._raw.append((c, a))

    def _end_reasoning(self) -> list[TokenSpan]:
        self._held = []  # trailing "\n"s are stripped
        self._raw.append(("\n", ()))
        out = self._commit(final=True) + [self._glue(END_THINK)]
        self._phase, self._started = "content", False
        self._raw.extend(("\n", ()) for _ in range(2))
        return out

    def _open_tool(self, key, name: str | None) -> list[TokenSpan]:
        out: list[TokenSpan] = []
        if self._phase == "reasoning":
            out += self._end_reasoning()
        if self._phase == "content":
            if self._content_any:
                self._raw.append(("\n", ()))
        else:
            self._flush_json(self._tool)
            out += self._close_tool()
            self._raw.append(("\n", ()))
        out += self._commit(final=True) + [self._glue(TOOL_CALL)]
        self._phase, self._tool = "tool", key
        self._tools_seen.add(key)
        self._raw.extend(view_chars((c, ()) for c in '\n{"name": "' + (name or "") + '", "arguments": '))
        return out

    def _flush_json(self, key) -> None:
        """The held chars of an incomplete escape at the end of a call's arguments, as they are."""
        decoder = self._json.get(key)
        if decoder is not None and decoder.pending:
            self._raw.extend(view_chars(decoder.flush()))

    def _close_tool(self) -> list[TokenSpan]:
        self._raw.extend((c, ()) for c in "}\n")
        return self._commit(final=True) + [self._glue(END_TOOL_CALL)]

    def _glue(self, tid: int) -> TokenSpan:
        return TokenSpan(tid, self._pos, self._pos)

    # ------------------------------------------------------------------ exact incremental encoding
    def _normalize(self, text: str) -> str:
        """The tokenizer's own normaliser (NFC for Qwen3)."""
        return self._normalizer.normalize_str(text) if self._normalizer is not None else text

    def _normalize_raw(self, final: bool) -> None:
        """Move complete normalisation clusters from ``_raw`` to ``_norm``/``_attr`` (all of them when ``final``)."""
        raw = self._raw
        cut = len(raw)
        if not final:
            cut = next((j for j in range(len(raw) - 1, 0, -1) if boundary_before(raw[j][0])), 0)
            if cut == 0 and len(raw) > self.max_pending:
                cut = len(raw) - 1  # safety valve: a cluster this long is adversarial; normalise it in parts
        i = 0
        while i < cut:
            j = i + 1
            while j < cut and not boundary_before(raw[j][0]):
                j += 1
            self._extend(raw[i:j])
            i = j
        del raw[:cut]

    def _extend(self, cluster: list[Sourced]) -> None:
        """Append the normalised chars of one cluster with the offsets each carries (module docstring)."""
        text = "".join(c for c, _ in cluster)
        normed = text if len(text) == 1 and boundary_before(text) else self._normalize(text)
        if normed == text:
            self._norm.extend(text)
            self._attr.extend(a for _, a in cluster)
            return
        # composition or reordering: the chars before the first change map 1:1, the rest of the cluster goes to the
        # first changed char
        same = 0
        while same < min(len(cluster), len(normed)) - 1 and cluster[same][0] == normed[same]:
            same += 1
        self._norm.extend(normed)
        self._attr.extend(a for _, a in cluster[:same])
        self._attr.append(tuple(o for _, a in cluster[same:] for o in a))
        self._attr.extend(() for _ in normed[same + 1:])

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

    def _encode_pretoken(self, bytelevel: str, chars: str, attr: list[tuple[int, ...]]) -> list[TokenSpan]:
        """BPE one pretoken; a token covers the offsets of every char it holds a UTF-8 byte of."""
        owner: list[tuple[int, ...]] = []  # per byte: the offsets of the char it belongs to
        for c, a in zip(chars, attr):
            owner += [a] * len(c.encode("utf-8"))
        out: list[TokenSpan] = []
        b = 0
        for tok in self._model.tokenize(bytelevel):
            nb = len(tok.value)  # one byte-level char per original byte
            covered = [o for a in owner[b:b + nb] for o in a]
            b += nb
            if covered:
                start, end = min(covered), max(covered) + 1
                self._pos = max(self._pos, end)
                out.append(TokenSpan(tok.id, start, end))
            else:
                out.append(self._glue(tok.id))
        return out
