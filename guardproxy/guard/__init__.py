"""The guard engine: native Qwen3Guard-Stream loading, incremental batched inference, verdicts (issue 2).

Import the submodules directly (``guardproxy.guard.engine``, ``.checkpoint``, ``.labels``); this package keeps its
import light so that ``guardproxy.guard.metrics`` and friends do not pull in torch.
"""
