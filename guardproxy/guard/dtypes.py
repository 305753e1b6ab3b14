"""Compute/storage dtype names of the guard, defined once (torch-free: the server config validates against them).

:data:`DTYPE_NAMES` are the names ``guardproxy classify --dtype`` and ``python -m guardproxy.testing.make_checkpoint
--dtype`` accept; :func:`torch_dtype` maps a name to its ``torch.dtype`` (``getattr(torch, name)``), importing torch
only when called. :data:`ENGINE_DTYPE_NAMES` are those the engine (``GuardEngine.from_pretrained(dtype=...)``) and
the server config (``guard.dtype``) accept: the same plus :data:`QUANTIZED` names, which compute in the float dtype
they map to with the projection weights quantised (``int8``: float32 activations, a bfloat16 KV cache, int8 weights
with one scale per output channel, activations quantised per row on the fly: PyTorch's dynamic quantisation, CPU
only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

#: Supported dtype names, each the name of a ``torch`` attribute.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: Quantised engine modes: name -> the float dtype of the activations (the dtype the checkpoint is loaded in).
QUANTIZED: dict[str, str] = {"int8": "float32"}
#: Names the engine and the server config accept.
ENGINE_DTYPE_NAMES: tuple[str, ...] = DTYPE_NAMES + tuple(QUANTIZED)


def torch_dtype(name: str) -> "torch.dtype":
    """The ``torch.dtype`` called ``name`` (one of :data:`DTYPE_NAMES`).

    Raises:
        ValueError: ``name`` is not in :data:`DTYPE_NAMES`.
    """
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    import torch

    return getattr(torch, name)
