"""Deterministic detectors beside the guard model: deny lists (phrases, regexes), allow lists (``exempt``) and
built-in patterns (email, phone, credit card with the Luhn check, IBAN with the ISO 13616 mod-97 check, API keys),
as a policy's ``detectors:`` configure them (:class:`guardproxy.config.Detector`).

Pure and synchronous (no I/O, no torch). Matching is the ``regex`` module's: one compiled alternation per detector
(built-in pattern, regexes, and the phrases as a named list ``\\L<...>`` between word boundaries), searched
leftmost-first. Streamed text is matched incrementally with the module's *partial* matches
(``search(..., partial=True)``: a match that the end of the text cut short), so that a match split across deltas,
or arriving one char per delta, is found exactly as in the whole text:

* :class:`Scanner` takes one choice's text in global-offset order, each piece with its *segment* (a channel: a
  match never spans two: reasoning, content, each tool call's arguments) or ``None`` (text not scanned);
* :attr:`Scanner.decided` is the offset before which every match is known: the start of the earliest possible
  match the text received so far leaves open (the longest partial match at the tail, or a complete one fewer than
  :data:`LOOKAHEAD` chars before the end, never more than the detector's ``max_chars`` + :data:`LOOKAHEAD`
  back), else the end of the text. The decider feeds the guard no token ending past it, so a detection is known
  before the token that completes it is decided on (see :mod:`guardproxy.moderation.decider`);
* :meth:`Scanner.take` hands over the matches found (:class:`Match`: detector, exact char span ``[start, end)``).

The matches are a function of the text and the segments alone, never of how the text was cut into pieces: at each
position the search either finds a complete match followed by :data:`LOOKAHEAD` chars (or the segment's end), or
a partial one or one closer to the end (then nothing is decided from there until more text comes), or none (the
``regex`` module reports a complete match in preference to a partial one, so a match touching the end of the text
received is not final; the limit: a user regex whose match depends on more than :data:`LOOKAHEAD` chars after it
may be found differently); a match longer than ``max_chars`` is none (the search goes on one char further), a
built-in match failing its check is none (the search goes on one char further), and a card is the whole run of
digit groups holding it (``ref 0958 4111 1111 1111 1111``: no digit of the card is left out, whichever groups it
is made of).

:func:`prompt_matches` runs the same detectors over the prompt's texts (each text whole).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Callable, Optional

import regex

from guardproxy.config import Detector, Policy

__all__ = [
    "BUILTIN_PATTERNS",
    "DETECTOR_LEVEL",
    "LOOKAHEAD",
    "Compiled",
    "Match",
    "Scanner",
    "compiled",
    "iban_valid",
    "luhn_valid",
    "prompt_matches",
]

#: The risk level a detector's decisions carry (a detector has no probabilities; theirs is 1.0).
DETECTOR_LEVEL = "Detected"

#: Chars after a match that must have arrived (or the segment ended) before the match counts as decided: more text
#: can change a match while the search still reads past its end (``4111 1111 1111 1111`` + `` 2``), which every
#: built-in pattern does at most 3 chars far.
LOOKAHEAD = 8
#: Chars kept before the search position, so that look-behinds see the text before it.
_CONTEXT = 16
#: The named group that holds a built-in pattern inside a detector's alternation.
_BUILTIN_GROUP = "_gp_builtin"
#: The named list that holds a detector's phrases.
_PHRASES = "_gp_phrases"


def luhn_valid(number: str) -> bool:
    """Does the digit string ``number`` pass the Luhn (mod 10) check (ISO/IEC 7812-1, annex B)? Non-digits ->
    False."""
    if not number.isascii() or not number.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(iban: str) -> bool:
    """Is ``iban`` (spaces allowed) a well-formed IBAN: 2 letters, 2 check digits, 11-30 letters or digits, 15-34
    chars in all, and the ISO 13616 check (the country code and check digits moved to the end, letters as 10-35:
    the number mod 97 is 1)?"""
    s = iban.replace(" ", "").upper()
    if not (15 <= len(s) <= 34) or not s.isascii() or not s.isalnum():
        return False
    if not (s[:2].isalpha() and s[2:4].isdigit()):
        return False
    moved = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


#: What may stand between two digits of a card: a space or a dash, or invisible format chars (a zero-width space).
_CARD_SEPARATORS = regex.compile(r"(?:[ -]|\p{Cf})+")


def _card_run(text: str) -> Optional[int]:
    """``text`` is a run of digit groups (any script's decimal digits; a space or dash, and invisible format chars,
    between them): its length when some
    consecutive groups of it hold 13-19 digits passing Luhn (the whole run counts, so that no digit of a card in
    ``ref 0958 4111 1111 1111 1111`` is left out whichever groups are the card), else None. A run without
    separators is one group."""
    groups = [g for g in _CARD_SEPARATORS.split(text) if g]
    for i in range(len(groups)):
        digits = ""
        for g in groups[i:]:
            digits += "".join(str(unicodedata.decimal(c, 0)) for c in g)
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_valid(digits):
                return len(text)
    return None


def _iban_length(text: str) -> Optional[int]:
    """The longest prefix of ``text`` (an IBAN-shaped run, maybe grouped by spaces) that ends a group and passes
    :func:`iban_valid` (``DE89 3704 0044 0532 0130 00 4111`` holds an IBAN), as a length, or None."""
    for i in range(len(text), 0, -1):
        if text[i - 1] != " " and (i == len(text) or text[i] == " ") and iban_valid(text[:i]):
            return i
    return None


def _whole(check: Callable[[str], bool]) -> Callable[[str], Optional[int]]:
    return lambda text: len(text) if check(text) else None


def _phone_valid(text: str) -> bool:
    return 9 <= sum(c.isdigit() for c in text) <= 15


#: The built-in patterns (``regex`` syntax, ASCII classes) and the check a match must pass: the length of the match
#: that counts (all of it, or a prefix of it), or None.
BUILTIN_PATTERNS: dict[str, tuple[str, Optional[Callable[[str], Optional[int]]]]] = {
    # local part @ domain labels . top-level domain (RFC 5321 sizes: 64 for the local part, 63 a label)
    "email": (r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
              r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?){0,8}\.[A-Za-z]{2,24}(?![A-Za-z0-9-])", None),
    # E.164 (+ and 8-15 digits) or groups of 2-4 digits with separators, optional +country and (area): 9-15 digits,
    # not next to more digit groups (a card's)
    "phone": (r"(?<![\w+])(?<!\d[ .-])(?:\+\d{8,15}|(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}"
              r"(?:[ .-]\d{2,4}){1,5})(?![\w])(?![ .-]\d)", _whole(_phone_valid)),
    # a run of 13 or more digits, single spaces or dashes (and invisible format chars) between them, holding 13-19
    # digits that pass Luhn
    "credit_card": (r"(?<![\w-])\d(?:(?:[ -]|\p{Cf}){0,2}\d){12,}(?![\w])", _card_run),
    # country code, check digits, 11-30 letters or digits, optionally grouped by spaces; mod-97-checked (a prefix
    # ending a group may be the IBAN)
    "iban": (r"(?<![\w])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![\w])", _iban_length),
    # OpenAI / Anthropic (sk-...), GitHub (ghp_, gho_, ghu_, ghs_, ghr_, github_pat_), AWS access key ids
    # (AKIA / ASIA), Slack (xoxb-, xoxp-, ...), Google (AIza), GitLab (glpat-), Stripe (sk_live_ / rk_live_)
    "api_key": (r"(?<![\w-])(?:sk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,200}|gh[pousr]_[A-Za-z0-9]{36,200}"
                r"|github_pat_[A-Za-z0-9_]{22,200}|(?:AKIA|ASIA)[A-Z0-9]{16}|xox[abposr]-[A-Za-z0-9-]{10,200}"
                r"|AIza[0-9A-Za-z_-]{35}|glpat-[A-Za-z0-9_-]{20,200}|[sr]k_live_[A-Za-z0-9]{16,200})(?![\w-])", None),
}


@dataclass(frozen=True)
class Compiled:
    """One detector, compiled: ``name`` (its category), the policy entry, the alternation, the built-in check."""

    name: str
    spec: Detector
    pattern: "regex.Pattern[str]"
    check: Optional[Callable[[str], Optional[int]]]

    @property
    def exempt(self) -> bool:
        return self.spec.exempt

    def accept(self, m: "regex.Match[str]") -> Optional[int]:
        """Where a complete match that counts ends (the built-in part passes its check, maybe on a prefix), or
        None."""
        if self.check is None or m.start(_BUILTIN_GROUP) < 0:
            return m.end()
        n = self.check(m.group(_BUILTIN_GROUP))
        return None if n is None else m.start() + n


def _compile(name: str, spec: Detector) -> Compiled:
    parts: list[str] = []
    check = None
    if spec.builtin is not None:
        pattern, check = BUILTIN_PATTERNS[spec.builtin]
        parts.append(f"(?P<{_BUILTIN_GROUP}>{pattern})")
    parts += [f"(?:{r})" for r in spec.regex]
    phrases = spec.all_phrases
    if phrases:
        body = rf"(?<!\w)\L<{_PHRASES}>(?!\w)"
        parts.append(body if spec.case_sensitive else f"(?i:{body})")
    return Compiled(name, spec, regex.compile("|".join(parts), **{_PHRASES: list(phrases)} if phrases else {}),
                    check)


_CACHE: dict[int, tuple[Policy, tuple[Compiled, ...]]] = {}


def compiled(policy: Policy) -> tuple[Compiled, ...]:
    """The policy's detectors, compiled once per policy object (a bounded cache)."""
    hit = _CACHE.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    out = tuple(_compile(name, spec) for name, spec in policy.detectors.items())
    if len(_CACHE) >= 256:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[id(policy)] = (policy, out)
    return out


@dataclass(frozen=True)
class Match:
    """A detector's match: ``detector`` (compiled), the exact char span ``[start, end)`` (global offsets)."""

    detector: Compiled
    start: int
    end: int

    @property
    def name(self) -> str:
        return self.detector.name


class _Search:
    """One detector's incremental search over one segment at a time (see :class:`Scanner`)."""

    def __init__(self, det: Compiled):
        self.det = det
        self.max_chars = det.spec.max_chars
        self.buf = ""
        self.base = 0  # global offset of buf[0]
        self.pos = 0  # index in buf where the search resumes
        self.open: Optional[int] = None  # global start of the partial match at the tail

    def reset(self, at: int) -> None:
        self.buf, self.base, self.pos, self.open = "", at, 0, None

    def feed(self, text: str, final: bool) -> Iterator[tuple[int, int]]:
        self.buf += text
        buf, pat = self.buf, self.det.pattern
        self.open = None
        pos = self.pos
        while pos < len(buf):
            m = pat.search(buf, pos, partial=not final)
            if m is None:
                pos = len(buf)
                break
            s, e = m.span()
            if m.partial:
                if s >= len(buf):
                    pos = len(buf)
                    break
                if len(buf) - s > self.max_chars:  # longer than a match may be: none starts at s
                    pos = s + 1
                    continue
                self.open, pos = self.base + s, s
                break
            if e == s or e - s > self.max_chars:
                pos = s + 1
                continue
            if not final and len(buf) - e < LOOKAHEAD:  # more text may still change this match: not decided yet
                self.open, pos = self.base + s, s
                break
            end = self.det.accept(m)
            if end is not None:
                pos = end
                yield self.base + s, self.base + end
            else:  # failed its check: a match may start further on (a card after a longer digit run)
                pos = s + 1
        cut = max(0, pos - _CONTEXT)
        self.buf, self.base, self.pos = buf[cut:], self.base + cut, pos - cut


class Scanner:
    """Every detector of a policy over one choice's text, incrementally (see the module docstring).

    Args:
        detectors: :func:`compiled` of the policy.
    """

    def __init__(self, detectors: Iterable[Compiled]):
        self._searches = [_Search(d) for d in detectors]
        self._segment: Hashable = None
        self._n = 0
        self._found: list[Match] = []
        self.closed = False

    @property
    def decided(self) -> float:
        """Global offset before which every match is known (``inf`` once :meth:`close` was called)."""
        if self.closed:
            return float("inf")
        opens = [s.open for s in self._searches if s.open is not None]
        return min(opens) if opens else self._n

    def push(self, text: str, segment: Hashable = "content") -> None:
        """The next chars of the choice; ``segment``: the channel they belong to (``None``: not scanned)."""
        if self.closed:
            raise RuntimeError("Scanner.push after close()")
        if segment != self._segment:
            self._end_segment()
            self._segment = segment
            for s in self._searches:
                s.reset(self._n)
        if segment is not None and text:
            for s in self._searches:
                self._found += [Match(s.det, a, b) for a, b in s.feed(text, final=False)]
        self._n += len(text)

    def close(self) -> None:
        """No more text: the open matches at the tail are decided. Idempotent."""
        if not self.closed:
            self._end_segment()
            self.closed = True

    def _end_segment(self) -> None:
        if self._segment is not None:
            for s in self._searches:
                self._found += [Match(s.det, a, b) for a, b in s.feed("", final=True)]
                s.open = None

    def take(self) -> list[Match]:
        """The matches found since the last call (each detector's in text order)."""
        out, self._found = self._found, []
        return out


def prompt_matches(policy: Policy, texts: Iterable[str]) -> list[Match]:
    """The matches of the policy's detectors that act on the prompt (``prompt`` not ``allow``), each of ``texts``
    scanned whole; a match inside a match of an ``exempt`` detector is dropped. Offsets are per text."""
    dets = compiled(policy)
    if not any(not d.exempt and d.spec.prompt != "allow" for d in dets):
        return []
    out: list[Match] = []
    for text in texts:
        sc = Scanner(dets)
        sc.push(text)
        sc.close()
        found = sc.take()
        exempt = [(m.start, m.end) for m in found if m.detector.exempt]
        out += [m for m in found if not m.detector.exempt and m.detector.spec.prompt != "allow"
                and not any(a <= m.start and m.end <= b for a, b in exempt)]
    return out
