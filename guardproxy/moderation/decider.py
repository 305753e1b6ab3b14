"""Decider: per-token verdicts of one choice -> debounced policy actions at global char offsets + a release bound.

Pure and synchronous (no I/O, no torch). One :class:`Decider` per choice; the pipeline gives it the choice's text
as it arrives (:meth:`Decider.text`, every piece in global-offset order) and pushes ``(TokenSpan, Verdict)`` pairs in
template order (assistant header glue, reasoning, content, tool arguments and the closing ``<|im_end|>`` are all
scored and pushed), then calls :meth:`Decider.finish`. The decider is the one owner of where text may be released
(:attr:`Decider.release_bound`) and where a cut or redaction starts.

Tiers and debounce (Qwen3Guard technical report, arXiv 2510.14276, and its ``eval_stream.py``, "Streaming decision
rule"): a token is *at or above* the Controversial tier
when its risk level is Controversial or Unsafe, and at the Unsafe tier when it is Unsafe. A *run* of a tier is a
maximal sequence of consecutive tokens at or above it. Token i is *debounced* at a tier when the tier's run ending at
i has at least k tokens; Unsafe wins over Controversial. The debounced token's category picks the policy action
(a category override beats the tier action). ``controversial_as`` maps Controversial tokens to Unsafe (Qwen's strict
setting) or Safe (loose) before any of this.

Actions (global char offsets of the choice, ``[start, end)``):

* ``Allow`` / ``Flag`` / ``Escalate``: emitted when a run first debounces, and again if a later token of the same run
  raises the action (allow -> flag -> escalate). Span: run start .. end of the debounced token.
* ``Redact``: the span runs from the first token of the tier's run to the last token of the run; it is emitted when
  the run is closed, i.e. by the first token below the tier (a Safe token for Controversial, a Safe or
  Controversial token for Unsafe), a cut, or :meth:`finish`. If a lower holding tier's run still contains the span
  (Unsafe span inside a Controversial run whose policy can redact or cut), emission waits for that run to close so
  that one region is emitted, never overlapping ones.
* ``Cut(at)``: ``at`` = start of the first token of the debounced tier's run, so no character of the run is
  released; any open redaction before ``at`` is emitted first. The decider ignores everything pushed after a cut.

Word starts: a guard often flags a word only at the token that completes it, so in buffered release the release
bound, a cut point and a redaction start are moved back to the start of the word they fall in (whitespace-delimited,
at most :data:`MAX_WORD_BACK` characters back, never below the release bound already given): the first part of a
flagged word never reaches the client. The word index is built incrementally as text arrives, so each lookup costs
O(log n), never a re-scan of the choice's text.

``safe_upto`` (buffered release) is the end of the newest token followed by at least ``hold_back`` scored tokens,
lowered to the start of any open run at a *holding* tier (a tier whose policy, over all categories, can redact or
cut) and of any pending redaction. A run is held from its first token, before it reaches k, because it may still
debounce; runs at tiers that can only allow or flag are not held (they cannot change the text). In async release
``safe_upto`` is the end of everything pushed; a Cut then stops what follows (the releaser has usually sent past
``at`` already). Offsets assume spans in non-decreasing order (``start_i >= start_{i-1}``); then ``safe_upto`` never
decreases. :attr:`Decider.release_bound` is ``safe_upto`` moved back to a word start (buffered release; after
:meth:`finish` everything scored).

Detectors (the policy's ``detectors:``, :mod:`guardproxy.moderation.detectors`): the decider scans the text it is
given (:meth:`Decider.text`, per channel ``segment``) and reports :attr:`Decider.decided`, the offset before which
every match is known; the caller pushes no token ending past it. A match is decided on at the first token pushed
that ends at or after the match's end (before that token's verdict), or at :meth:`finish`; its action carries the
detector's name as category and risk level :data:`~guardproxy.moderation.detectors.DETECTOR_LEVEL`: ``Redact``
of exactly the matched span (a redaction starting inside one emitted earlier starts at its end), ``Cut`` at its
first char (at the start of the unit holding it), ``Flag`` / ``Allow``. While a match that redacts or cuts waits,
``safe_upto`` stays at or before its first char; a model cut decides the waiting matches starting before it first.
A token inside a match of an ``exempt`` detector (an allow list) counts as Safe, whatever the model said, and a
match inside one is dropped.

Every value the decider reports depends only on the tokens pushed, their verdicts and the text received up to them,
never on how the pushes were batched: a streamed response and the same response scored whole get the same actions
at the same offsets.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Optional, Protocol, Union

import regex

from guardproxy.config import ACTION_SEVERITY, Policy
from guardproxy.guard.normalize import REMOVED
from guardproxy.guard.labels import canonical_category, canonical_level
from guardproxy.moderation.detectors import DETECTOR_LEVEL, Match, Scanner, compiled, prompt_matches

__all__ = [
    "Allow",
    "Flag",
    "Escalate",
    "Redact",
    "Cut",
    "Action",
    "Decider",
    "PromptDecision",
    "PromptDetection",
    "ShadowDecision",
    "decide_prompt",
    "detect_prompt",
    "prompt_texts",
    "risk_level",
    "SpanLike",
    "VerdictLike",
]

_RANK = {"Safe": 0, "Controversial": 1, "Unsafe": 2}
#: Most characters a word start may lie before the offset it is looked up for (longer "words" are cut there).
MAX_WORD_BACK = 48
_BOUNDARY = regex.compile(r"\b", flags=regex.WORD | regex.V1)
#: Chars the word-boundary rules do not skip (UAX #29 WB4 skips Extend, Format and ZWJ after a char).
_BASE = regex.compile(r"[^\p{Word_Break=Extend}\p{Word_Break=Format}\p{Word_Break=ZWJ}]")
#: What a char the guard's view removes stands for when words are found: U+2060 WORD JOINER (a format char, which
#: the rules skip), one code point for one, so offsets stay.
WORD_JOINER = "\u2060"
#: Chars after a lookup offset that a lookup reads at most (a boundary needs only the next two base chars).
_LOOKAHEAD = 32
_TIERS = ("Controversial", "Unsafe")


class _WordStarts:
    """Where the words of one choice's text start, by Unicode's default word boundaries (UAX #29, as the ``regex``
    module's ``WORD`` flag implements them: punctuation and whitespace end a word, each ideograph is a word of its
    own, a katakana run or a letter/digit run such as ``it's`` or ``3.14`` is one word), built incrementally. The
    text is read as the guard reads it: a char its view removes (:data:`guardproxy.guard.normalize.REMOVED`, e.g. a
    zero-width space) joins the word around it.

    ``push(text)`` appends text (global offsets continue); ``start(at, floor, scored)`` is the start of the word
    holding char ``at``: ``at`` itself when that char is whitespace or not received yet, else the last boundary at
    or before ``at``, but never below ``floor`` nor more than :data:`MAX_WORD_BACK` chars back. A lookup reads only
    the text scored so far (``scored``: the end of the newest scored token) plus one char, at most
    :data:`_LOOKAHEAD` chars past ``at``, and a boundary counts only with the two base chars after it in that text
    (``3.`` may still become ``3.14``; extend and format chars between them are skipped as the rules skip them),
    or anywhere once :meth:`close` said no more text comes: what is decided depends on the scored tokens alone,
    never on how much text happened to have arrived (the streamed and the whole-completion path see the same
    boundaries). Each lookup reads a window of
    about :data:`MAX_WORD_BACK` chars around ``at``: O(window), never the whole text. ``forget(before)`` drops text more than 4096 chars before ``before`` (the decider only looks near
    its release bound).
    """

    def __init__(self) -> None:
        self._chunks: list[str] = []
        self._starts: list[int] = []  # global offset of each chunk
        self._head = 0  # chunks before it are forgotten
        self._n = 0
        self._closed = False

    def push(self, text: str) -> None:
        if text:
            self._starts.append(self._n)
            self._chunks.append(text)
            self._n += len(text)

    def close(self) -> None:
        self._closed = True

    def _slice(self, a: int, b: int) -> str:
        """Chars ``[a, b)`` of the text (``a`` clamped to what is not forgotten)."""
        i = max(self._head, bisect.bisect_right(self._starts, a, self._head) - 1)
        out = []
        while i < len(self._chunks) and self._starts[i] < b:
            s = self._starts[i]
            out.append(self._chunks[i][max(0, a - s) : b - s])
            i += 1
        return "".join(out)

    def start(self, at: int, floor: int, scored: int) -> int:
        if at >= self._n:
            return at
        lo = max(floor, at - MAX_WORD_BACK)
        if at <= lo:
            return at
        end = min(self._n if self._closed else min(self._n, scored + 1), at + _LOOKAHEAD)
        w0 = max(self._starts[self._head] if self._head < len(self._starts) else 0, lo - 4)
        window = REMOVED.sub(WORD_JOINER, self._slice(w0, end))  # as the guard reads it: "zeb\u200brafish" is a word
        if window[at - w0].isspace():
            return at
        if self._closed and end == self._n:
            trusted = end  # no text comes after the window
        else:  # a boundary needs two base chars after it (the rules skip extend and format chars)
            bases = [i for i in range(len(window) - 1, -1, -1) if _BASE.match(window, i)][:2]
            trusted = w0 + bases[1] if len(bases) == 2 else -1
        best = lo
        for m in _BOUNDARY.finditer(window, pos=max(0, lo - w0)):
            p = w0 + m.start()
            if p > at:
                break
            if (p > w0 or w0 == 0) and p <= trusted:
                best = p
        return best

    def forget(self, before: int) -> None:
        cut = before - 4096
        while self._head + 1 < len(self._starts) and self._starts[self._head + 1] <= cut:
            self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._starts):
            del self._starts[: self._head], self._chunks[: self._head]
            self._head = 0


class SpanLike(Protocol):
    """What the decider needs of a ``TokenSpan``: token id and the global char range ``[start, end)`` it covers."""

    id: int
    start: int
    end: int


class VerdictLike(Protocol):
    """What the decider needs of a ``Verdict``: risk label, category label, label -> probability."""

    risk_level: str
    category: str
    probs: Mapping[str, float]


@dataclass(frozen=True)
class _Detection:
    """A debounced detection: its risk ``level``, ``category``, the index of the token that completed the run (k-th
    consecutive token) and that token's probability of ``level``."""

    level: str
    category: str
    token_index: int
    probability: float


@dataclass(frozen=True)
class Allow(_Detection):
    """A debounced detection the policy allows (for metrics and audit only). Offsets in chars, ``[start, end)``."""

    start: int
    end: int


@dataclass(frozen=True)
class Flag(_Detection):
    """A debounced detection to annotate and log; the text is released unchanged. Offsets in chars."""

    start: int
    end: int


@dataclass(frozen=True)
class Escalate(Flag):
    """A debounced detection to annotate, log and send for review (a review event); the text is released
    unchanged. Offsets in chars."""


@dataclass(frozen=True)
class Redact(_Detection):
    """Replace the chars ``[start, end)`` with ``mask`` (buffered release only)."""

    start: int
    end: int
    mask: str


@dataclass(frozen=True)
class Cut(_Detection):
    """End the choice at char ``at`` with ``finish_reason: "content_filter"``; nothing from ``at`` on is released."""

    at: int


Action = Union[Allow, Flag, Escalate, Redact, Cut]


@dataclass
class _Run:
    first_index: int
    start: int
    length: int = 0
    severity: int = -1  # most severe allow/flag action already emitted for this run


@dataclass
class _Region:
    tier: str
    first_index: int
    start: int
    end: int
    level: str
    category: str
    token_index: int
    probability: float
    extendable: bool = True


def _probability(verdict: VerdictLike, level: str) -> float:
    probs = getattr(verdict, "probs", None) or {}
    for label, p in probs.items():
        if canonical_level(label) == level:
            return float(p)
    return math.nan


def risk_level(stage: Any, verdict: VerdictLike, category: Optional[str], channel: Optional[str] = None) -> str:
    """The risk level a verdict counts as under a stage's probability thresholds (``unsafe_at``,
    ``controversial_at``; :meth:`guardproxy.config.PromptPolicy.threshold`), per category and channel:

    * Unsafe when P(Unsafe) >= ``unsafe_at``; with no ``unsafe_at``, when the argmax level is Unsafe.
    * else Controversial when P(Controversial) >= ``controversial_at``; with no ``controversial_at``, when the
      argmax level is Controversial or Unsafe (an Unsafe argmax below a raised ``unsafe_at`` counts as
      Controversial).
    * else Safe.

    With no threshold set this is the argmax level. A verdict without the probability a threshold needs is read by
    its argmax level for that tier.

    Raises:
        ValueError: unknown risk label.
    """
    level = canonical_level(verdict.risk_level)
    if level is None:
        raise ValueError(f"unknown risk level {verdict.risk_level!r}")
    u_at, c_at = stage.threshold("Unsafe", category, channel), stage.threshold("Controversial", category, channel)
    if u_at is None and c_at is None:
        return level
    pu, pc = _probability(verdict, "Unsafe"), _probability(verdict, "Controversial")
    if (pu >= u_at) if u_at is not None and not math.isnan(pu) else level == "Unsafe":
        return "Unsafe"
    if (pc >= c_at) if c_at is not None and not math.isnan(pc) else level != "Safe":
        return "Controversial"
    return "Safe"


class Decider:
    """Debounce + response policy for one choice. See the module doc for the exact rules.

    Args:
        policy: the tenant's :class:`~guardproxy.config.Policy` (``response``, ``release``, ``hold_back``,
            ``debounce``, ``controversial_as``, ``mask`` are used).
        buffered: release mode; default ``policy.release == "buffered"`` (a whole completion is always scored as
            buffered: nothing of it is sent before all of it is scored).
    Raises (from :meth:`push`): ValueError for an unknown risk label; RuntimeError after :meth:`finish`.
    """

    def __init__(self, policy: Policy, *, buffered: bool | None = None):
        self.policy = policy
        self.k = policy.debounce
        self.hold_back = policy.hold_back
        self.buffered = policy.release == "buffered" if buffered is None else buffered
        blocking = {"redact", "cut"}
        self._holding = {t: bool(policy.response.actions_for_level(t) & blocking) for t in _TIERS}
        self._recent: list[tuple[int, int]] = []  # (start, end) of the last hold_back + 1 tokens
        self._n = 0
        self._max_end = 0
        self._safe = 0
        self._runs: dict[str, Optional[_Run]] = {t: None for t in _TIERS}
        self._region: Optional[_Region] = None
        self._words = _WordStarts()
        self._text_len = 0
        self._unit: object = None  # the unit (a tool call) the latest text belongs to
        self._units: list[list] = []  # [start, end or None while open] of every unit, in order
        self._channels: list[tuple[int, Optional[str]]] = []  # (start, channel) where the channel changes
        self._unscored_unit = 0  # index of the first unit not scored through its end
        self._bound = 0
        detectors = compiled(policy)
        self._scan = Scanner(detectors) if detectors else None
        self._waiting: list[Match] = []  # detector matches not decided on yet, by (end, start)
        self._exempt: list[tuple[int, int]] = []  # spans of exempt (allow-list) matches, by start
        self._redacted: list[tuple[int, int]] = []  # spans of the redactions emitted, by start (those past the bound)
        self.cut: Optional[Cut] = None
        self.finished = False

    # -- public -------------------------------------------------------------------------------------------------------
    @property
    def safe_upto(self) -> int:
        """Token-level bound (exclusive char offset): never inside a run that may still be cut or redacted."""
        return self._safe

    @property
    def release_bound(self) -> int:
        """Char offset the releaser may release up to (exclusive): :attr:`safe_upto` moved back to a word start in
        buffered release, and never past the first char of a unit (see :meth:`text`) not scored through its end (see
        the module docstring); never decreases."""
        bound = self._bound
        if self.cut is not None:
            return min(bound, self.cut.at) if self.buffered else bound
        if not self.buffered or self.finished or not self._units:
            return bound
        units = self._units
        while self._unscored_unit < len(units) and units[self._unscored_unit][1] is not None \
                and units[self._unscored_unit][1] <= self._max_end:
            self._unscored_unit += 1
        if self._unscored_unit < len(units):
            bound = min(bound, units[self._unscored_unit][0])
        held = [r.start for t, r in self._runs.items() if r is not None and self._holding[t]]
        if self._region is not None:
            held.append(self._region.start)
        if (waiting := self._held_detection()) is not None:
            held.append(waiting)
        if held:  # a unit a cut may still start in is held whole
            unit = self._unit_at(min(held))
            if unit is not None:
                bound = min(bound, unit[0])
        return bound

    def _unit_at(self, at: int) -> Optional[list]:
        """The unit ``[start, end]`` holding char ``at``, if any."""
        i = bisect.bisect_right(self._units, at, key=lambda u: u[0]) - 1
        if i >= 0 and (self._units[i][1] is None or at < self._units[i][1]):
            return self._units[i]
        return None

    def text(self, text: str, unit: object = None, channel: Optional[str] = None,
             segment: object = "content") -> None:
        """The next characters of the choice (every piece, moderated or not, in global-offset order).

        ``channel``: ``content`` / ``reasoning`` / ``tool_arguments``, the section of ``policy.response.channels``
        whose rules apply to tokens starting in this text (a token covering no char, template glue, belongs to the
        text before it).

        ``segment``: the channel the text belongs to, for the policy's detectors (a match never spans two; ``None``:
        text the detectors do not read, e.g. a channel the policy does not moderate).

        ``unit``: a key for text that must reach the client whole or not at all (a tool call's arguments: the
        client acts on the complete call). In buffered release the bound stays at a unit's first char until text
        of another unit (or of none) arrives, or :meth:`finish`; a cut inside a unit starts at the unit's first
        char, so a cut tool call is never sent in part."""
        if unit != self._unit:
            if self._units and self._units[-1][1] is None:
                self._units[-1][1] = self._text_len
            self._unit = unit
            if unit is not None:
                self._units.append([self._text_len, None])
        if text and (not self._channels or self._channels[-1][1] != channel):
            self._channels.append((self._text_len, channel))
        self._words.push(text)
        self._text_len += len(text)
        if self._scan is not None:
            self._scan.push(text, segment)

    def text_end(self) -> None:
        """No more text comes for the choice (the detectors decide what the end of the text left open).
        Idempotent; :meth:`finish` implies it."""
        if self._scan is not None:
            self._scan.close()

    @property
    def decided(self) -> float:
        """Char offset before which every detector match is known (:attr:`Scanner.decided`; ``inf`` without
        detectors or after :meth:`text_end`). The caller pushes no token ending past it, so a detection is known
        before the token completing it is pushed, in a streamed and a whole response alike."""
        return self._scan.decided if self._scan is not None else math.inf

    def _channel_at(self, span: SpanLike) -> Optional[str]:
        """The channel of a token: of its first char, or (no char) of the char before it."""
        at = span.start if span.end > span.start else span.start - 1
        i = bisect.bisect_right(self._channels, at, key=lambda c: c[0]) - 1
        return self._channels[max(i, 0)][1] if self._channels else None

    def span_text(self, start: int, end: int, limit: int) -> str:
        """The choice's chars ``[start, end)`` as received, at most ``limit`` of them (the decider keeps the text
        from about 4096 chars before its release bound on; older chars are not returned)."""
        return self._words._slice(start, min(end, start + limit))

    @property
    def done(self) -> bool:
        """True once the choice was cut or finished: nothing further can change."""
        return self.cut is not None or self.finished

    def feed(self, pairs: Iterable[tuple[SpanLike, VerdictLike]]) -> list[Action]:
        """:meth:`push` every pair in order; the concatenated actions."""
        out: list[Action] = []
        for span, verdict in pairs:
            out += self.push(span, verdict)
        return out

    def push(self, span: SpanLike, verdict: VerdictLike) -> list[Action]:
        """Consume the next scored token of the choice; returns the actions decided by it (often none)."""
        if self.finished:
            raise RuntimeError("Decider.push after finish()")
        i = self._n
        self._n += 1
        if self.cut is not None:
            return []
        channel = self._channel_at(span)
        category = canonical_category(verdict.category) or verdict.category
        level = risk_level(self.policy.response, verdict, category, channel)
        if level == "Controversial" and self.policy.controversial_as != "controversial":
            level = self.policy.controversial_as.capitalize()
        detected: list[Action] = []
        if self._scan is not None:
            self._collect()
            detected = self._detect(i, span.end)
            if self.cut is not None:
                self._update_safe()
                return detected
            if level != "Safe" and self._exempted(span):
                level = "Safe"
        rank = _RANK[level]
        self._max_end = max(self._max_end, span.end)
        self._recent.append((span.start, span.end))
        if len(self._recent) > self.hold_back + 1:
            del self._recent[0]

        for tier in _TIERS:
            run = self._runs[tier]
            if rank >= _RANK[tier]:
                if run is None:
                    run = self._runs[tier] = _Run(i, span.start)
                run.length += 1
            else:
                self._runs[tier] = None

        out: list[Action] = []
        region = self._region
        if region is not None:
            if rank < _RANK[region.tier]:
                region.extendable = False
            elif region.extendable:
                region.end = max(region.end, span.end)

        fired = next((t for t in reversed(_TIERS) if (r := self._runs[t]) is not None and r.length >= self.k), None)
        if fired is not None:
            out += self._apply(fired, i, span, verdict, category, channel)
        if self.cut is None and self._region is not None and not self._region_held():
            out += self._clipped(self._close_region())
        self._update_safe()
        return detected + out if detected else out

    def finish(self) -> list[Action]:
        """End of the choice: emit a pending redaction; ``safe_upto`` becomes the end of all text (unless cut)."""
        if self.finished:
            return []
        self.finished = True
        self._words.close()
        out: list[Action] = []
        if self._scan is not None and self.cut is None:
            self._scan.close()
            self._collect()
            out += self._detect(self._n, math.inf)
        if self.cut is None:
            if self._region is not None:
                out += self._clipped(self._close_region())
            self._runs = {t: None for t in _TIERS}
            self._safe = max(self._safe, self._max_end)
            self._bound = max(self._bound, self._safe)
        return out

    # -- internals ----------------------------------------------------------------------------------------------------
    def _apply(self, tier: str, i: int, span: SpanLike, verdict: VerdictLike, category: str,
               channel: Optional[str]) -> list[Action]:
        run = self._runs[tier]
        assert run is not None
        action = self.policy.response.action(tier, category, channel)
        prob = _probability(verdict, tier)
        out: list[Action] = []
        if action == "cut":
            if self._waiting:  # detections starting before the cut are decided first (their chars go out before it)
                out += self._detect_before(self._cut_at(run.start), i)
                if self.cut is not None:
                    return out
            region = self._region
            if region is not None and region.start < run.start:
                out += self._clipped(self._close_region(end=min(region.end, run.start)))
            self._region = None
            self.cut = Cut(tier, category, i, prob, at=self._cut_at(run.start))
            out.append(self.cut)
        elif action == "redact":
            region = self._region
            if region is None:
                self._region = _Region(tier, run.first_index, run.start, span.end, tier, category, i, prob)
            else:
                if _RANK[tier] <= _RANK[region.tier]:  # the current token is at or above `tier`
                    region.tier, region.extendable = tier, True
                if run.first_index < region.first_index:
                    region.first_index, region.start = run.first_index, run.start
                region.end = max(region.end, span.end)
                if _RANK[tier] >= _RANK[region.level]:
                    region.level, region.category, region.token_index, region.probability = tier, category, i, prob
        else:
            sev = ACTION_SEVERITY[action]
            if sev > run.severity:
                run.severity = sev
                cls = {"flag": Flag, "escalate": Escalate}.get(action, Allow)
                # a flag changes no text: its span starts at the word's start in either release mode
                out.append(cls(tier, category, i, prob, start=self._words.start(run.start, 0, self._max_end), end=span.end))
        return out

    def _region_held(self) -> bool:
        """Is the pending redaction still extendable, or inside an open run of a holding tier?"""
        region = self._region
        assert region is not None
        if region.extendable:
            return True
        return any(
            self._holding[t] and (r := self._runs[t]) is not None and r.first_index <= region.first_index
            for t in _TIERS
        )

    def _clipped(self, r: Redact) -> list[Action]:
        """``r`` as emitted: a redaction starting inside one emitted before starts at that one's end instead (its
        mask may be out already; the chars in between are redacted), and is dropped when nothing is left of it.
        One starting at or before an earlier one's start merges with it in the releaser, before anything of
        either is released. So the text is the same however the release interleaved with the decisions."""
        start = r.start
        for a, b in self._redacted:
            if a < start < b:
                start = b
        if start != r.start and start >= r.end:
            return []
        self._redacted = [(a, b) for a, b in self._redacted if b > self._bound] + [(start, r.end)]
        self._redacted.sort()
        return [r if start == r.start else replace(r, start=start)]

    def _close_region(self, end: Optional[int] = None) -> Redact:
        r = self._region
        assert r is not None
        self._region = None
        return Redact(r.level, r.category, r.token_index, r.probability, start=self._word_start(r.start),
                      end=r.end if end is None else end, mask=self.policy.mask_for(r.category))

    def _word_start(self, at: int) -> int:
        """``at`` moved back to its word's start in buffered release (never below the release bound given)."""
        return self._words.start(at, self._bound, self._max_end) if self.buffered else at

    def _cut_at(self, at: int) -> int:
        """Where a cut of a run starting at ``at`` starts: its word's start, or the start of the unit it is in."""
        at = self._word_start(at)
        unit = self._unit_at(at) if self.buffered else None
        return at if unit is None else unit[0]

    def _update_safe(self) -> None:
        self._set_safe()
        if self.buffered and self.cut is None:
            self._bound = self._words.start(self._safe, self._bound, self._max_end)
            self._words.forget(self._bound)
        else:
            self._bound = max(self._bound, self._safe)

    def _set_safe(self) -> None:
        if self.cut is not None:
            self._safe = self.cut.at if self.buffered else self._max_end
            return
        if not self.buffered:
            self._safe = self._max_end
            return
        if len(self._recent) <= self.hold_back:
            return  # fewer than hold_back + 1 tokens scored: nothing is releasable yet
        start_r, end_r = self._recent[0]
        bound = end_r
        if len(self._recent) > 1:
            bound = min(bound, self._recent[1][0])  # a char shared with the next token waits for it
        for tier in _TIERS:
            run = self._runs[tier]
            if run is not None and self._holding[tier]:
                bound = min(bound, run.start)
        if self._region is not None:
            bound = min(bound, self._region.start)
        held = self._held_detection()
        if held is not None:
            bound = min(bound, held)
        self._safe = bound

    # -- detectors ----------------------------------------------------------------------------------------------------
    def _collect(self) -> None:
        """Take the scanner's new matches: exempt spans aside, the others waiting in (end, start) order."""
        assert self._scan is not None
        for m in self._scan.take():
            if m.detector.exempt:
                bisect.insort(self._exempt, (m.start, m.end))
            else:
                bisect.insort(self._waiting, m, key=lambda w: (w.end, w.start))

    def _exempted(self, span: SpanLike) -> bool:
        """Does the token lie inside an exempt match (whitespace around its text aside)? A glue token never does."""
        if span.end <= span.start or not self._exempt:
            return False
        text = self._words._slice(span.start, span.end)
        a = span.start + len(text) - len(text.lstrip())
        b = span.end - (len(text) - len(text.rstrip()))
        if a >= b:
            return False
        j = bisect.bisect_right(self._exempt, (a, math.inf))
        return any(s <= a and b <= e for s, e in self._exempt[max(0, j - 64):j])

    def _inside_exempt(self, m: Match) -> bool:
        j = bisect.bisect_right(self._exempt, (m.start, math.inf))
        return any(s <= m.start and m.end <= e for s, e in self._exempt[max(0, j - 64):j])

    def _detect(self, i: int, upto: float) -> list[Action]:
        """The actions of the waiting matches that end at or before ``upto`` (the end of the token ``i``)."""
        out: list[Action] = []
        while self._waiting and self._waiting[0].end <= upto and self.cut is None:
            out += self._detection(self._waiting.pop(0), i)
        return out

    def _detect_before(self, at: int, i: int) -> list[Action]:
        """A cut at ``at`` comes: the waiting matches that start before it are decided now (a redaction ends at
        ``at``; a detector's cut before ``at`` is the cut)."""
        out: list[Action] = []
        for m in sorted((m for m in self._waiting if m.start < at), key=lambda m: m.start):
            self._waiting.remove(m)
            out += self._detection(m, i, end=min(m.end, at))
            if self.cut is not None:
                break
        return out

    def _detection(self, m: Match, i: int, end: Optional[int] = None) -> list[Action]:
        """The action of a detector's match ``m`` decided at token ``i`` (none inside an exempt match)."""
        if self._inside_exempt(m):
            return []
        action, name = m.detector.spec.response, m.name
        end = m.end if end is None else end
        if action == "cut":
            out: list[Action] = []
            region = self._region
            if region is not None and region.start < m.start:
                out += self._clipped(self._close_region(end=min(region.end, m.start)))
            self._region = None
            unit = self._unit_at(m.start) if self.buffered else None
            self.cut = Cut(DETECTOR_LEVEL, name, i, 1.0, at=m.start if unit is None else unit[0])
            return out + [self.cut]
        if action == "redact":
            return self._clipped(Redact(DETECTOR_LEVEL, name, i, 1.0, start=m.start, end=end,
                                        mask=self.policy.mask_for(name)))
        cls = Flag if action == "flag" else Allow
        return [cls(DETECTOR_LEVEL, name, i, 1.0, start=m.start, end=end)]

    def _held_detection(self) -> Optional[int]:
        """The first char of the earliest waiting match that changes the text (redact or cut), if any."""
        starts = [m.start for m in self._waiting if m.detector.spec.response in ("redact", "cut")]
        return min(starts) if starts else None


@dataclass(frozen=True)
class ShadowDecision:
    """What a shadow policy would have done (recorded only, never applied).

    Attributes:
        policy: the shadow policy's name.
        stage: ``prompt`` or ``response``.
        choice: the choice index (0 for the prompt).
        action: the action it would have taken (``allow``, ``flag``, ``redact``, ``cut``, ``block``).
        level / category / probability: the detection (risk level under its thresholds, canonical category, P).
        token: index of the scored token that decided it in the choice (template glue counted), None for the prompt.
        start / end: global char offsets of its span in the choice (a cut: both its point), None for the prompt.
    """

    policy: str
    stage: str
    choice: int
    action: str
    level: str
    category: str
    probability: float
    token: Optional[int] = None
    start: Optional[int] = None
    end: Optional[int] = None

    @classmethod
    def of(cls, policy: str, choice: int, action: Action) -> "ShadowDecision":
        """The record of a decider action of a shadow policy on ``choice``."""
        kind = {Allow: "allow", Flag: "flag", Escalate: "escalate", Redact: "redact", Cut: "cut"}[type(action)]
        start, end = (action.at, action.at) if isinstance(action, Cut) else (action.start, action.end)
        return cls(policy, "response", choice, kind, action.level, action.category, action.probability,
                   action.token_index, start, end)


@dataclass(frozen=True)
class PromptDecision:
    """The prompt-stage outcome: ``action`` is ``allow`` / ``flag`` / ``block``; category canonicalized."""

    action: str
    level: str
    category: str
    probability: float


def decide_prompt(policy: Policy, verdict: VerdictLike) -> PromptDecision:
    """Apply ``policy.prompt`` to the prompt verdict (query head; no debounce: one verdict per prompt): its level
    under the prompt thresholds (:func:`risk_level`), then the action matrix. ``level`` is that level,
    ``probability`` the verdict's P(level).

    Raises:
        ValueError: unknown risk label.
    """
    category = canonical_category(verdict.category) or verdict.category
    level = risk_level(policy.prompt, verdict, category)
    return PromptDecision(policy.prompt.action(level, category), level, category, _probability(verdict, level))


def prompt_texts(conversations: Iterable[Iterable[Mapping]]) -> list[str]:
    """Every string a conversation's messages hold (content and its parts, tool-call arguments, names, ...), each
    whole; the ``role`` and ``type`` tags aside."""
    out: list[str] = []

    def walk(value: object, key: object = None) -> None:
        if isinstance(value, str):
            if key not in ("role", "type"):
                out.append(value)
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    for messages in conversations:
        for message in messages:
            walk(message)
    return out


@dataclass(frozen=True)
class PromptDetection:
    """The prompt-stage outcome of the policy's detectors: ``action`` (``flag`` / ``block``), the detector's
    name (its category) and the risk level and probabilities a verdict carries (:data:`DETECTOR_LEVEL`, 1.0), so
    that it reads as a verdict in headers and error bodies (never the matched text)."""

    action: str
    category: str
    risk_level: str = DETECTOR_LEVEL
    category_prob: float = 1.0

    @property
    def probs(self) -> dict[str, float]:
        return {DETECTOR_LEVEL: 1.0}

    @property
    def decision(self) -> PromptDecision:
        """The detection as the prompt stage's decision (its action, level and category; probability 1.0)."""
        return PromptDecision(self.action, self.risk_level, self.category, self.category_prob)


def detect_prompt(policy: Policy, conversations: Iterable[Iterable[Mapping]]) -> Optional[PromptDetection]:
    """The most severe prompt action of the policy's detectors over every text of ``conversations`` (the first
    detector reaching it), or None when none acts (no detector with a ``prompt`` action matched, or its matches lie
    inside exempt ones)."""
    if not policy.detects_prompt:
        return None
    best: Optional[PromptDetection] = None
    for m in prompt_matches(policy, prompt_texts(conversations)):
        action = m.detector.spec.prompt
        if best is None or ACTION_SEVERITY[action] > ACTION_SEVERITY[best.action]:
            best = PromptDetection(action, m.name)
    return best
