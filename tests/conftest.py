"""Shared fixtures: the real Qwen3 tokenizer and locally built checkpoints (built once per test session)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))



def pytest_addoption(parser):
    parser.addoption("--soak", action="store_true", default=False,
                     help="run the load tests in their long form (tests/e2e/test_soak.py)")


SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
FIXTURES = SHARED / "fixtures" / "sse"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the checkout (read-only notes and fixtures)."""
    assert SHARED.is_dir(), f"expected the shared folder at {SHARED}"
    return SHARED


@pytest.fixture(scope="session")
def sse_manifest() -> dict:
    """``../shared/fixtures/sse/manifest.json``: fixture name -> what a correct relay must reassemble."""
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """Directory with the real Qwen3 tokenizer files (tokenizer.json, tokenizer_config.json)."""
    from guardproxy.testing.tokenizer import write_tokenizer

    return write_tokenizer(tmp_path_factory.mktemp("qwen3_tokenizer"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight Qwen3Guard-Stream checkpoint of the tiny shape (real vocabulary, 2 layers), seed 0."""
    from guardproxy.testing.checkpoint_format import guard_config, random_state_dict, save_checkpoint

    cfg = guard_config("tiny")
    return save_checkpoint(tmp_path_factory.mktemp("tiny_random"), cfg, random_state_dict(cfg, seed=0))


@pytest.fixture(scope="session")
def planted_checkpoint(tmp_path_factory) -> Path:
    """A planted checkpoint: "zebrafish" -> Unsafe/Violent, "marzipan" -> Controversial/PII (both heads)."""
    from guardproxy.testing.planted import write_planted_checkpoint

    return write_planted_checkpoint(
        tmp_path_factory.mktemp("planted"),
        triggers={"zebrafish": ("Unsafe", "Violent"), "marzipan": ("Controversial", "PII")},
    )


@pytest.fixture(scope="session")
def planted_engine(planted_checkpoint):
    """One GuardEngine on the planted checkpoint (CPU, 128 live streams) shared by the end-to-end modules; every test
    that opens guard streams must leave none live (they check ``stats().live_streams == 0``)."""
    from guardproxy.guard.engine import GuardEngine

    eng = GuardEngine.from_pretrained(str(planted_checkpoint), device="cpu", max_streams=128)
    yield eng
    eng.close()


@pytest.fixture
def engine(planted_engine):
    """The shared planted engine under the name the end-to-end tests use (modules with their own engine override it)."""
    return planted_engine
