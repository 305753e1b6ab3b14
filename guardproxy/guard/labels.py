"""Verdicts and the label maps of a Qwen3Guard-Stream checkpoint.

Label names and their order always come from ``config.json`` (``response_risk_level_map``,
``response_category_map``, ``query_risk_level_map``, ``query_category_map``; string keys ``"0"``, ``"1"``, ...), never
from a hard-coded list: several third-party ports got the risk order wrong. In the published configs
(``Qwen/Qwen3Guard-Stream-*`` on the Hugging Face Hub) risk index 0 = Safe, 1 = Unsafe, 2 = Controversial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch


#: Risk levels of both Qwen3Guard-Stream heads, in increasing severity.
RISK_LEVELS = ("Safe", "Controversial", "Unsafe")

#: Canonical category names (short names from the Qwen3Guard model card). Jailbreak exists on the prompt head only.
CATEGORIES = (
    "Violent",
    "Sexual Content",
    "Self-Harm",
    "Political",
    "PII",
    "Copyright",
    "Illegal Acts",
    "Unethical",
    "Jailbreak",
)
PROMPT_ONLY_CATEGORIES = frozenset({"Jailbreak"})

# Long names (technical report / config maps) and common spellings -> canonical short name.
_CATEGORY_ALIASES = {
    "violent": "Violent",
    "violence": "Violent",
    "sexual content": "Sexual Content",
    "sexual content or sexual acts": "Sexual Content",
    "sexual acts": "Sexual Content",
    "self-harm": "Self-Harm",
    "self harm": "Self-Harm",
    "suicide & self-harm": "Self-Harm",
    "suicide and self-harm": "Self-Harm",
    "political": "Political",
    "politically sensitive topics": "Political",
    "pii": "PII",
    "personally identifiable information": "PII",
    "copyright": "Copyright",
    "copyright violation": "Copyright",
    "illegal acts": "Illegal Acts",
    "non-violent illegal acts": "Illegal Acts",
    "unethical": "Unethical",
    "unethical acts": "Unethical",
    "jailbreak": "Jailbreak",
}


def _norm_label(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def canonical_category(name: str) -> Optional[str]:
    """Canonical category for a label or policy key, or None if unknown.

    Matching is case-insensitive, ignores repeated whitespace and treats ``_`` as a space, so the model's
    config-map label ("Sexual Content or Sexual Acts"), the model card's ("Sexual Content") and a policy key
    ("sexual_content") all map to ``"Sexual Content"``.
    """
    return _CATEGORY_ALIASES.get(_norm_label(name))


_LEVELS = {lvl.casefold(): lvl for lvl in RISK_LEVELS}


def canonical_level(name: str) -> Optional[str]:
    """Canonical risk level ("Safe" / "Controversial" / "Unsafe") for a label, case-insensitive; None if unknown."""
    return _LEVELS.get(name.strip().casefold())


MAP_KEYS = ("response_risk_level_map", "response_category_map", "query_risk_level_map", "query_category_map")


@dataclass(frozen=True)
class Verdict:
    """The guard's reading at one position.

    Attributes:
        risk_level: argmax risk label from the config map, e.g. ``"Safe"``, ``"Unsafe"``, ``"Controversial"``.
        probs: every risk label -> softmax probability (float32 softmax, not rounded).
        category: argmax category label from the config map (reported even when the level is Safe, like the
            official code).
        category_prob: softmax probability of that category.
    """

    risk_level: str
    probs: dict[str, float]
    category: str
    category_prob: float

    def to_json(self) -> dict:
        """``{"risk_level", "probs", "category", "category_prob"}`` (plain JSON types)."""
        return {
            "risk_level": self.risk_level,
            "probs": dict(self.probs),
            "category": self.category,
            "category_prob": self.category_prob,
        }


def _ordered(config: dict, key: str) -> tuple[str, ...]:
    m = config.get(key)
    if not isinstance(m, dict) or not m:
        raise ValueError(f"config.json has no label map {key!r}")
    try:
        idx = sorted(int(k) for k in m)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.json {key!r} keys must be integer strings, got {list(m)}") from e
    if idx != list(range(len(idx))):
        raise ValueError(f"config.json {key!r} keys must be 0..{len(idx) - 1}, got {sorted(m)}")
    return tuple(str(m[str(i)]) for i in idx)


@dataclass(frozen=True)
class GuardLabels:
    """Label names by head index, read from the config maps.

    Attributes:
        risk, category: response-head labels (index i -> ``risk[i]``), lengths num_risk_level / num_category.
        query_risk, query_category: prompt ("query") head labels, lengths num_query_risk_level / num_query_category.
    """

    risk: tuple[str, ...]
    category: tuple[str, ...]
    query_risk: tuple[str, ...]
    query_category: tuple[str, ...]

    @classmethod
    def from_config(cls, config: dict) -> "GuardLabels":
        """Read the four maps of ``config.json``.

        Raises:
            ValueError: a map is missing, its keys are not ``"0".."n-1"``, or its size disagrees with ``num_*``.
        """
        labels = cls(*(_ordered(config, k) for k in MAP_KEYS))
        for got, size_key in zip(
            (labels.risk, labels.category, labels.query_risk, labels.query_category),
            ("num_risk_level", "num_category", "num_query_risk_level", "num_query_category"),
        ):
            if size_key in config and int(config[size_key]) != len(got):
                raise ValueError(f"config.json {size_key}={config[size_key]} but its label map has {len(got)} entries")
        return labels


def verdicts(risk_logits: torch.Tensor, category_logits: torch.Tensor, risk_labels, category_labels) -> list[Verdict]:
    """One :class:`Verdict` per row of a head's logits.

    Args:
        risk_logits: [N, num_risk] logits; category_logits: [N, num_category] logits (any float dtype).
        risk_labels, category_labels: label names by index (from :class:`GuardLabels`).
    Returns:
        N verdicts; probabilities are a float32 softmax over each row.
    """
    if risk_logits.shape[0] == 0:
        return []
    rp = risk_logits.float().softmax(dim=-1)
    cp = category_logits.float().softmax(dim=-1)
    cprob, cidx = cp.max(dim=-1)
    ridx = rp.argmax(dim=-1).tolist()
    rows = rp.tolist()
    out = []
    for r, probs, ci, cpr in zip(ridx, rows, cidx.tolist(), cprob.tolist()):
        out.append(Verdict(risk_labels[r], dict(zip(risk_labels, probs)), category_labels[ci], cpr))
    return out
