"""The guard's typed errors, in one torch-free module so that callers can catch them without loading the model code.

Two families:

* engine admission and life cycle (:class:`EngineOverloaded`, :class:`EngineClosed`, :class:`StreamClosed`), raised by
  :mod:`guardproxy.guard.engine` and :mod:`guardproxy.guard.scheduler`; the proxy maps them to a tenant's fail mode;
* checkpoint loading (:class:`CheckpointError` and its subclasses), raised by :mod:`guardproxy.guard.checkpoint` and,
  for a tokenizer that disagrees with the control-token table, by :func:`guardproxy.guard.tokens.check_tokenizer`.

``guardproxy.guard.engine`` and ``guardproxy.guard.checkpoint`` re-export the classes they raise.
"""

from __future__ import annotations

__all__ = [
    "BadConfig",
    "CheckpointError",
    "CheckpointNotFound",
    "EngineClosed",
    "EngineOverloaded",
    "HubUnavailable",
    "MissingCheckpointFile",
    "NotAGuardModel",
    "StreamClosed",
    "TokenizerMismatch",
]


class EngineOverloaded(Exception):
    """Admission refused: ``max_streams`` live streams or ``kv_budget_tokens`` held (fail fast, nothing queued)."""


class EngineClosed(Exception):
    """The engine was closed: new work is refused and pending work fails with this."""


class StreamClosed(Exception):
    """Work on (or pending for) a stream after its ``close()``."""


class CheckpointError(Exception):
    """Base class of every loading error."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """Neither a local directory nor a Hub id that could be resolved."""


class HubUnavailable(CheckpointNotFound):
    """A Hub id that is not in the local Hugging Face cache while the Hub cannot be reached."""


class MissingCheckpointFile(CheckpointError, FileNotFoundError):
    """The directory lacks ``config.json``, the safetensors weights (or a shard) or ``tokenizer.json``."""


class NotAGuardModel(CheckpointError):
    """The weights have no Qwen3Guard-Stream head tensors (e.g. a plain Qwen3 LM) or the config lacks guard keys."""


class BadConfig(CheckpointError, ValueError):
    """``config.json`` is unreadable, lacks a required key, or describes an unsupported variant."""


class TokenizerMismatch(CheckpointError, ValueError):
    """``tokenizer.json`` disagrees with the control/template token ids the guard inserts itself
    (:mod:`guardproxy.guard.tokens`); the message names the token, the expected id and what the tokenizer has."""
