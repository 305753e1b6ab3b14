"""The guard's view of text: what the guard model reads of a string a client shows or acts on (torch-free).

A person reads ``"zeb\\u200brafish"``, ``"ｚｅｂｒａｆｉｓｈ"`` or ``"zebraﬁsh"`` as one word; a byte-level tokenizer
reads something else. Every text the guard scores (the prompt's client text in
:meth:`guardproxy.guard.template.ChatRenderer.encode_text`, the response in
:class:`guardproxy.moderation.retokenizer.Retokenizer`) is therefore read through one view, defined here char by
char, then NFC (UAX #15) over the result, which the Qwen3 tokenizer applies anyway::

    view(text) = NFC("".join(fold(c) for c in text))

* ``fold(c) == ""`` for the REMOVED chars (:func:`removed`): the code points with Unicode's
  ``Default_Ignorable_Code_Point`` property (UAX #44, DerivedCoreProperties.txt: "should be ignored in rendering"
  unless supported: zero-width space / joiners U+200B..U+200D, word joiner U+2060 and the invisible operators
  U+2061..U+2064, U+FEFF, soft hyphen U+00AD, the bidi controls U+061C, U+200E, U+200F, U+202A..U+202E,
  U+2066..U+2069, variation selectors U+FE00..U+FE0F, U+E0100..U+E01EF and the Mongolian ones, tag characters
  U+E0000..U+E007F, Hangul fillers, U+034F, unassigned ignorables) plus every other character of general category
  ``Cf`` (format) except the ``Prepended_Concatenation_Mark`` characters (U+0600..U+0605, U+06DD, U+070F, U+0890,
  U+0891, U+08E2, U+110BD, U+110CD: visible signs that carry a number, so they change what a reader sees).
  Dropping ZWJ / ZWNJ / variation selectors loses only how emoji sequences and some scripts join (a family emoji
  reads as its members): nothing a guard decides on.
* ``fold(c) == NFKC(c)`` for the FOLDED chars (:func:`folded`): the compatibility forms of letters, digits and
  marks, i.e. the chars whose NFKC differs from their NFC and contains a letter or digit (``\\p{L}``, ``\\p{N}``) or
  is marks only: fullwidth ``"ｚ"`` -> ``"z"`` and ``"２"`` -> ``"2"``, ligatures ``"ﬁ"`` -> ``"fi"``, circled /
  super- / subscript / mathematical letters, long s, Roman numerals, ``"™"`` -> ``"TM"``, halfwidth katakana and
  their sound marks, Arabic presentation forms. Compatibility punctuation, symbols and spaces (``"，"``, ``"！"``,
  ``"…"``, NBSP, U+3000) are ordinary text in many languages and disguise no word: they stay as they are, and so do
  compatibility forms whose NFKC holds conjoining Hangul jamo (the compatibility jamo ``"ㅋ"`` that Korean text
  writes, and their halfwidth / parenthesised / circled forms), which text never otherwise contains.
* every other char is itself.

Tag characters U+E0020..U+E007E are invisible, but they map one to one onto printable ASCII (U+E0041 is a tagged
``"A"``), and a model reading a prompt can read a message written in them ("ASCII smuggling"). Removing them keeps
what a person reads; :func:`tag_text` gives what they spell, which the prompt's rendering reads as well
(:meth:`guardproxy.guard.template.ChatRenderer.encode_text`), so a hidden instruction is scored like a visible one.

No fold contains a REMOVED char or a FOLDED one, so the view is idempotent; it is the identity on ASCII. It is used
for scoring only: what the client receives is never changed by it. Tool-call arguments are read one step earlier:
:class:`JsonStringDecoder` decodes the JSON string escapes of the argument text (RFC 8259, section 7), whose decoded
values are what a client acts on, before the view applies.

Streaming: the fold works char by char; NFC is cut where :func:`boundary_before` holds (UAX #15, "Detecting
Normalization Forms": before a char with canonical combining class 0 and ``NFC_Quick_Check=Yes``, text normalises
independently of what follows).
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable

import regex

__all__ = ["JsonStringDecoder", "REMOVED", "Sourced", "boundary_before", "fold", "folded", "remove", "removed",
           "tag_text", "view", "view_chars"]

#: The chars the view deletes (see the module docstring).
REMOVED = regex.compile(r"[\p{Default_Ignorable_Code_Point}\p{Cf}--\p{Prepended_Concatenation_Mark}]",
                        flags=regex.V1)
_LETTER_OR_DIGIT = regex.compile(r"[\p{L}\p{N}]")
_MARKS = regex.compile(r"\p{M}+")
_CONJOINING_JAMO = regex.compile(r"[\u1100-\u11FF\uA960-\uA97F\uD7B0-\uD7FF]")
#: Code points before which NFC may NOT cut the text (they can combine with / reorder against the previous char).
_NO_BOUNDARY_BEFORE = regex.compile(r"[\p{NFC_QC=N}\p{NFC_QC=M}\P{ccc=0}]")

#: A char the guard reads and the global char offsets of the client chars it came from (``()`` for template glue;
#: several for a decoded JSON escape or a char NFC composed from several).
Sourced = tuple[str, tuple[int, ...]]


_TAG_RUN = regex.compile(r"[\U000E0020-\U000E007E]+")


def tag_text(text: str) -> str:
    """The ASCII that the runs of tag characters (U+E0020..U+E007E) in ``text`` spell, each run after a space
    (``""`` when there are none): ``"Hi" + "\U000E0068\U000E0069"`` -> ``" hi"``."""
    if text.isascii():
        return ""
    return "".join(" " + "".join(chr(ord(c) - 0xE0000) for c in run) for run in _TAG_RUN.findall(text))


def removed(c: str) -> bool:
    """Is the single char ``c`` deleted from the guard's view?"""
    return c >= "\x80" and REMOVED.match(c) is not None


def remove(text: str) -> str:
    """``text`` without its REMOVED chars (nothing folded)."""
    return text if text.isascii() else REMOVED.sub("", text)


def folded(c: str) -> bool:
    """Is the single char ``c`` read as its NFKC (a compatibility form of letters, digits or marks)?"""
    return c >= "\xa0" and _fold(c) not in ("", c)


@functools.lru_cache(maxsize=8192)
def _fold(c: str) -> str:
    if REMOVED.match(c):
        return ""
    k = unicodedata.normalize("NFKC", c)
    if k == unicodedata.normalize("NFC", c) or _CONJOINING_JAMO.search(k):
        return c
    return k if _LETTER_OR_DIGIT.search(k) or _MARKS.fullmatch(k) else c


def fold(c: str) -> str:
    """The single char ``c`` as the guard reads it before NFC: ``""`` (REMOVED), its NFKC (FOLDED) or itself."""
    return c if c < "\x80" else _fold(c)


def view(text: str) -> str:
    """The guard's view of ``text`` (module docstring). Idempotent; the identity on ASCII."""
    if text.isascii():
        return text
    return unicodedata.normalize("NFC", "".join(map(fold, text)))


def view_chars(chars: Iterable[Sourced]) -> list[Sourced]:
    """The chars the guard reads of ``chars`` before NFC: each folded (:func:`fold`), the chars of a fold carrying the
    offsets of the char they came from (``"ﬁ"`` at offset 7 -> ``("f", (7,)), ("i", (7,))``), REMOVED ones gone."""
    out: list[Sourced] = []
    for c, a in chars:
        if c < "\x80":
            out.append((c, a))
        else:
            out += [(x, a) for x in _fold(c)]
    return out


def boundary_before(c: str) -> bool:
    """Does NFC start a new segment before the char ``c``, whatever precedes it? When true, for any ``a`` and ``b``:
    ``NFC(a + c + b) == NFC(a) + NFC(c + b)``. Conservative: false for every char that may compose with or reorder
    against what precedes it (canonical combining class != 0, NFC quick check No or Maybe)."""
    return c < "\x80" or _NO_BOUNDARY_BEFORE.match(c) is None


_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")


class JsonStringDecoder:
    """Incremental decoder of the string escapes of one JSON text (RFC 8259, section 7), fed in fragments.

    Outside strings every char passes through; inside a string ``\\"  \\\\  \\/  \\b  \\f  \\n  \\r  \\t`` and
    ``\\uXXXX`` become the char they stand for, a ``\\uD8xx\\uDCxx`` surrogate pair one char, a lone surrogate
    U+FFFD (as :mod:`guardproxy.wire.jsonio` reads one). A malformed escape (``\\x``, ``\\u12G4``) passes through as
    its raw chars. The text need not be valid JSON; a quote toggles "inside a string", a backslash outside strings
    is an ordinary char.

    ``feed(text, start)``: the next fragment, whose first char has global offset ``start``; returns the decoded
    chars that are final, each with the offsets of the raw chars it came from (a decoded escape: all of its raw
    chars). The chars of an escape not complete yet (a trailing ``\\``, ``\\u00``, a high surrogate waiting for its
    low half) are held: :attr:`pending` counts them, :meth:`flush` releases them as they are (end of the text).
    """

    def __init__(self) -> None:
        self._in_string = False
        self._esc: list[tuple[str, int]] = []  # raw chars of the escape being read, from its backslash
        self._high: tuple[int, tuple[int, ...]] | None = None  # a decoded high surrogate and its raw offsets

    @property
    def pending(self) -> tuple[int, ...]:
        """Offsets of the raw chars held back."""
        return (self._high[1] if self._high else ()) + tuple(o for _, o in self._esc)

    def feed(self, text: str, start: int) -> list[Sourced]:
        out: list[Sourced] = []
        for k, c in enumerate(text):
            self._char(c, start + k, out)
        return out

    def flush(self) -> list[Sourced]:
        """The held chars as they are (a lone high surrogate as U+FFFD); the decoder stays usable."""
        out: list[Sourced] = []
        self._lone_high(out)
        out += [(c, (o,)) for c, o in self._esc]
        self._esc = []
        return out

    def _char(self, c: str, o: int, out: list[Sourced]) -> None:
        esc = self._esc
        if esc:
            esc.append((c, o))
            kind = esc[1][0]
            if len(esc) == 2 and kind != "u":
                self._lone_high(out)
                self._esc = []
                if kind in _SIMPLE_ESCAPES:
                    out.append((_SIMPLE_ESCAPES[kind], (esc[0][1], o)))
                else:
                    out += [(ch, (off,)) for ch, off in esc]
            elif len(esc) > 2 and c not in _HEX:  # malformed \u escape: raw, and this char read anew
                self._lone_high(out)
                self._esc = []
                out += [(ch, (off,)) for ch, off in esc[:-1]]
                self._char(c, o, out)
            elif len(esc) == 6:
                self._esc = []
                self._code(int("".join(ch for ch, _ in esc[2:]), 16), tuple(off for _, off in esc), out)
            return
        if self._in_string and c == "\\":
            self._esc = [(c, o)]
            return
        self._lone_high(out)
        if c == '"':
            self._in_string = not self._in_string
        out.append((c, (o,)))

    def _code(self, code: int, offs: tuple[int, ...], out: list[Sourced]) -> None:
        if self._high is not None and 0xDC00 <= code <= 0xDFFF:
            high, hoffs = self._high
            self._high = None
            out.append((chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00)), hoffs + offs))
            return
        self._lone_high(out)
        if 0xD800 <= code <= 0xDBFF:
            self._high = (code, offs)
        else:
            out.append(("\ufffd" if 0xDC00 <= code <= 0xDFFF else chr(code), offs))

    def _lone_high(self, out: list[Sourced]) -> None:
        if self._high is not None:
            out.append(("\ufffd", self._high[1]))
            self._high = None
