"""Compute/storage dtype names of the guard, defined once (torch-free: the server config validates against them).

:data:`DTYPE_NAMES` are the names the server config (``guard.dtype``), ``guardproxy classify --dtype`` and
``python -m guardproxy.testing.make_checkpoint --dtype`` accept; :func:`torch_dtype` maps a name to its ``torch.dtype``
(``getattr(torch, name)``), importing torch only when called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Supported dtype names, each the name of a ``torch`` attribute.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> "torch.dtype":
    """The ``torch.dtype`` called ``name`` (one of :data:`DTYPE_NAMES`).

    Raises:
        ValueError: ``name`` is not in :data:`DTYPE_NAMES`.
    """
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    return getattr(torch, name)
