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

* ``Allow`` / ``Flag``: emitted when a run first debounces, and again if a later token of the same run raises the
  action (allow -> flag). Span: run start .. end of the debounced token.
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

Every value the decider reports depends only on the tokens pushed, their verdicts and the text received up to them,
never on how the pushes were batched: a streamed response and the same response scored whole get the same actions
at the same offsets.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Protocol, Union

from guardproxy.config import ACTION_SEVERITY, Policy
from guardproxy.guard.labels import canonical_category, canonical_level

__all__ = [
    "Allow",
    "Flag",
    "Redact",
    "Cut",
    "Action",
    "Decider",
    "PromptDecision",
    "decide_prompt",
    "SpanLike",
    "VerdictLike",
]

_RANK = {"Safe": 0, "Controversial": 1, "Unsafe": 2}
#: Most characters a word start may lie before the offset it is looked up for (longer "words" are cut there).
MAX_WORD_BACK = 48
_SPACE = re.compile(r"\s")
_TIERS = ("Controversial", "Unsafe")


class _WordStarts:
    """Where the whitespace-delimited words of one choice's text start, built incrementally.

    ``push(text)`` appends text (global offsets continue); ``start(at, floor)`` is the start of the word holding
    char ``at``: ``at`` itself when that char is whitespace or not received yet, else moved back over non-whitespace
    chars, but never below ``floor`` nor more than :data:`MAX_WORD_BACK` chars. ``forget(before)`` drops the index
    of chars before ``before - 4096`` (lookups there may then stop short; the decider only looks near its bound).
    """

    def __init__(self) -> None:
        self._n = 0
        self._spaces: list[int] = []  # offsets of whitespace chars, ascending
        self._head = 0  # entries before it are forgotten

    def push(self, text: str) -> None:
        base = self._n
        self._spaces.extend(base + m.start() for m in _SPACE.finditer(text))
        self._n += len(text)

    def start(self, at: int, floor: int) -> int:
        if at >= self._n:
            return at
        i = bisect.bisect_left(self._spaces, at, self._head)
        if i < len(self._spaces) and self._spaces[i] == at:
            return at
        lo = max(floor, at - MAX_WORD_BACK)
        if at <= lo:
            return at
        space = self._spaces[i - 1] if i > self._head else -1
        return max(lo, space + 1)

    def forget(self, before: int) -> None:
        cut = before - 4096
        while self._head < len(self._spaces) and self._spaces[self._head] < cut:
            self._head += 1
        if self._head > 1024 and self._head * 2 > len(self._spaces):
            del self._spaces[: self._head]
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
class Redact(_Detection):
    """Replace the chars ``[start, end)`` with ``mask`` (buffered release only)."""

    start: int
    end: int
    mask: str


@dataclass(frozen=True)
class Cut(_Detection):
    """End the choice at char ``at`` with ``finish_reason: "content_filter"``; nothing from ``at`` on is released."""

    at: int


Action = Union[Allow, Flag, Redact, Cut]


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
        self._bound = 0
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
        buffered release (see the module docstring); never decreases."""
        return self._bound

    def text(self, text: str) -> None:
        """The next characters of the choice (every piece, moderated or not, in global-offset order)."""
        self._words.push(text)

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
        level = canonical_level(verdict.risk_level)
        if level is None:
            raise ValueError(f"unknown risk level {verdict.risk_level!r}")
        if level == "Controversial" and self.policy.controversial_as != "controversial":
            level = self.policy.controversial_as.capitalize()
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
            out += self._apply(fired, i, span, verdict)
        if self.cut is None and self._region is not None and not self._region_held():
            out.append(self._close_region())
        self._update_safe()
        return out

    def finish(self) -> list[Action]:
        """End of the choice: emit a pending redaction; ``safe_upto`` becomes the end of all text (unless cut)."""
        if self.finished:
            return []
        self.finished = True
        out: list[Action] = []
        if self.cut is None:
            if self._region is not None:
                out.append(self._close_region())
            self._runs = {t: None for t in _TIERS}
            self._safe = max(self._safe, self._max_end)
            self._bound = max(self._bound, self._safe)
        return out

    # -- internals ----------------------------------------------------------------------------------------------------
    def _apply(self, tier: str, i: int, span: SpanLike, verdict: VerdictLike) -> list[Action]:
        run = self._runs[tier]
        assert run is not None
        category = canonical_category(verdict.category) or verdict.category
        action = self.policy.response.action(tier, category)
        prob = _probability(verdict, tier)
        out: list[Action] = []
        if action == "cut":
            region = self._region
            if region is not None and region.start < run.start:
                out.append(self._close_region(end=min(region.end, run.start)))
            self._region = None
            self.cut = Cut(tier, category, i, prob, at=self._word_start(run.start))
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
                cls = Flag if action == "flag" else Allow
                # a flag changes no text: its span starts at the word's start in either release mode
                out.append(cls(tier, category, i, prob, start=self._words.start(run.start, 0), end=span.end))
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

    def _close_region(self, end: Optional[int] = None) -> Redact:
        r = self._region
        assert r is not None
        self._region = None
        return Redact(r.level, r.category, r.token_index, r.probability, start=self._word_start(r.start),
                      end=r.end if end is None else end, mask=self.policy.mask)

    def _word_start(self, at: int) -> int:
        """``at`` moved back to its word's start in buffered release (never below the release bound given)."""
        return self._words.start(at, self._bound) if self.buffered else at

    def _update_safe(self) -> None:
        self._set_safe()
        if self.buffered and self.cut is None:
            self._bound = self._words.start(self._safe, self._bound)
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
        self._safe = bound


@dataclass(frozen=True)
class PromptDecision:
    """The prompt-stage outcome: ``action`` is ``allow`` / ``flag`` / ``block``; category canonicalized."""

    action: str
    level: str
    category: str
    probability: float


def decide_prompt(policy: Policy, verdict: VerdictLike) -> PromptDecision:
    """Apply ``policy.prompt`` to the prompt verdict (query head; no debounce: one verdict per prompt).

    Raises:
        ValueError: unknown risk label.
    """
    level = canonical_level(verdict.risk_level)
    if level is None:
        raise ValueError(f"unknown risk level {verdict.risk_level!r}")
    category = canonical_category(verdict.category) or verdict.category
    return PromptDecision(policy.prompt.action(level, category), level, category, _probability(verdict, level))
