"""Write a local Qwen3Guard-Stream checkpoint directory for tests, benchmarks and demos (no Hub access).

Usage::

    python -m guardproxy.testing.make_checkpoint OUT_DIR --kind random|planted --shape tiny|0.6b
        [--seed N] [--dtype float32|bfloat16|float16] [--trigger WORD=LEVEL:CATEGORY ...]

``OUT_DIR`` receives ``config.json`` (stock Qwen3 config + guard keys and label maps), ``model.safetensors`` and the
real Qwen3 tokenizer files, in the format of :mod:`guardproxy.testing.checkpoint_format`.

* ``--kind random``: random weights of the chosen backbone shape (``tiny``: real vocabulary, 2 layers;
  ``0.6b``: the real Qwen3Guard-Stream-0.6B shape). Default dtype: float32 for ``tiny``, bfloat16 for ``0.6b``
  (halves the ~2.4 GB file). Deterministic for a given ``--seed``.
* ``--kind planted``: hand-built exact weights (:mod:`guardproxy.testing.planted`) under which each
  ``--trigger WORD=LEVEL:CATEGORY`` drives the response and prompt heads to LEVEL/CATEGORY where WORD occurs, and
  everything else stays Safe. ``--shape`` is accepted but selects nothing: the planted backbone is sized by the
  triggers. ``--seed`` is accepted and ignored (the construction is deterministic). Without ``--trigger`` the
  default triggers :data:`guardproxy.testing.planted.DEFAULT_TRIGGERS` are planted. Default dtype float32 (exact).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from guardproxy.guard.dtypes import DTYPE_NAMES, torch_dtype
from guardproxy.testing.checkpoint_format import SHAPES, guard_config, random_state_dict, save_checkpoint


def default_dtype(kind: str, shape: str) -> torch.dtype:
    """Storage dtype used when ``--dtype`` is not given: bfloat16 for a random 0.6B-shaped checkpoint, else float32."""
    return torch.bfloat16 if (kind == "random" and shape == "0.6b") else torch.float32


def parse_trigger(spec: str) -> tuple[str, tuple[str, str]]:
    """Parse ``WORD=LEVEL:CATEGORY`` (e.g. ``zebrafish=Unsafe:Violent``) into ``(word, (level, category))``.

    The word is everything before the LAST ``=``; the level is up to the first ``:`` after it; the category is the
    rest (it may contain spaces, e.g. ``"Sexual Content or Sexual Acts"``). Names are validated later, against the
    config maps, by :func:`guardproxy.testing.planted.write_planted_checkpoint`.

    Raises:
        ValueError: missing ``=`` or ``:``, or an empty part.
    """
    word, eq, rest = spec.rpartition("=")
    level, colon, category = rest.partition(":")
    if not eq or not colon or not word or not level.strip() or not category.strip():
        raise ValueError(f"trigger {spec!r} is not of the form WORD=LEVEL:CATEGORY")
    return word, (level.strip(), category.strip())


def make_checkpoint(
    out_dir: str | Path,
    *,
    kind: str,
    shape: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    triggers: dict[str, tuple[str, str]] | None = None,
) -> Path:
    """Write a checkpoint directory and return its path.

    Args:
        out_dir: target directory (created if needed; existing files of the same names are overwritten).
        kind: ``"random"`` or ``"planted"``.
        shape: a key of :data:`guardproxy.testing.checkpoint_format.SHAPES` (``"tiny"``, ``"0.6b"``); ignored for planted.
        seed: RNG seed for random weights; ignored for planted.
        dtype: storage dtype; ``None`` means :func:`default_dtype`.
        triggers: planted only: word -> (risk level, category); ``None`` means the planted default triggers.
    Raises:
        ValueError: unknown kind or shape, triggers given for a random checkpoint, or invalid triggers.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    dtype = dtype or default_dtype(kind, shape)
    if kind == "random":
        if triggers:
            raise ValueError("--trigger only applies to --kind planted")
        cfg = guard_config(shape)
        return save_checkpoint(out_dir, cfg, random_state_dict(cfg, seed=seed, dtype=dtype))
    if kind == "planted":
        from guardproxy.testing.planted import DEFAULT_TRIGGERS, write_planted_checkpoint

        return write_planted_checkpoint(out_dir, triggers or DEFAULT_TRIGGERS, seed=seed, dtype=dtype)
    raise ValueError(f"unknown kind {kind!r}; expected 'random' or 'planted'")


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of the command (see the module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m guardproxy.testing.make_checkpoint",
        description="Write a local Qwen3Guard-Stream checkpoint (config.json, model.safetensors, tokenizer files).",
    )
    p.add_argument("out_dir", type=Path, help="output directory")
    p.add_argument("--kind", choices=["random", "planted"], required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="backbone shape (random only)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed (random only)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                   help="storage dtype (default: bfloat16 for random 0.6b, else float32)")
    p.add_argument("--trigger", action="append", default=[], metavar="WORD=LEVEL:CATEGORY",
                   help="planted only, repeatable: e.g. zebrafish=Unsafe:Violent")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (argparse exits with 2 on bad arguments)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        triggers = dict(parse_trigger(s) for s in args.trigger) or None
        out = make_checkpoint(args.out_dir, kind=args.kind, shape=args.shape, seed=args.seed,
                              dtype=torch_dtype(args.dtype) if args.dtype else None, triggers=triggers)
    except (ValueError, KeyError) as e:
        parser.error(str(e))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
