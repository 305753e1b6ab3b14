"""guard.dtypes: one list of dtype names; the torch mapping, the server config and the command lines follow it."""

from __future__ import annotations

import pydantic
import pytest
import torch

from guardproxy.config import GuardSettings
from guardproxy.guard.dtypes import DTYPE_NAMES, ENGINE_DTYPE_NAMES, torch_dtype


def test_each_name_maps_to_the_torch_dtype_of_that_name():
    assert DTYPE_NAMES == ("float32", "bfloat16", "float16")
    for name in DTYPE_NAMES:
        assert torch_dtype(name) is getattr(torch, name) and isinstance(torch_dtype(name), torch.dtype)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'fp8'"):
        torch_dtype("fp8")


def test_the_server_config_accepts_exactly_auto_and_the_names():
    assert ENGINE_DTYPE_NAMES == DTYPE_NAMES + ("int8",)
    for name in ("auto", *ENGINE_DTYPE_NAMES):
        s = GuardSettings(dtype=name)
        assert s.engine_kwargs()["dtype"] == (None if name == "auto" else name)
    for bad in ("fp8", "float64", "Float32", "", "qint8"):
        with pytest.raises(pydantic.ValidationError, match="expected auto, float32, bfloat16, float16 or int8"):
            GuardSettings(dtype=bad)


def test_the_command_lines_offer_the_names():
    from guardproxy.eval.classify import _parser
    from guardproxy.testing.make_checkpoint import build_parser

    for parser in (_parser(), build_parser()):
        (action,) = [a for a in parser._actions if "--dtype" in a.option_strings]
        assert tuple(action.choices) == DTYPE_NAMES
