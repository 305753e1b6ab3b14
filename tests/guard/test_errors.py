"""guard.errors: the one definition of the guard's typed errors, re-exported where they are raised, torch-free."""

from __future__ import annotations

import subprocess
import sys

from guardproxy.guard import checkpoint, engine, errors


def test_engine_and_checkpoint_re_export_the_same_classes():
    for name in ("EngineOverloaded", "EngineClosed", "StreamClosed"):
        assert getattr(engine, name) is getattr(errors, name)
    for name in ("CheckpointError", "CheckpointNotFound", "HubUnavailable", "MissingCheckpointFile",
                 "NotAGuardModel", "BadConfig"):  # fmt: skip
        assert getattr(checkpoint, name) is getattr(errors, name)
        assert issubclass(getattr(errors, name), errors.CheckpointError)
    assert issubclass(errors.HubUnavailable, errors.CheckpointNotFound)
    assert issubclass(errors.CheckpointNotFound, FileNotFoundError) and issubclass(errors.BadConfig, ValueError)


def test_torch_free_guard_modules_import_without_torch():
    """moderation/ and server/ import these cheaply, the scheduler is pure: none pulls in torch or the model code."""
    code = (
        "import sys\n"
        "import guardproxy.guard.dtypes, guardproxy.guard.errors, guardproxy.guard.labels\n"
        "import guardproxy.guard.scheduler, guardproxy.guard.tokens\n"
        "heavy = ('torch', 'tokenizers', 'guardproxy.guard.model')\n"
        "bad = sorted(m for m in sys.modules if m in heavy or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
