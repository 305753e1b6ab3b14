"""The guard engine: native Qwen3Guard-Stream loading, incremental batched inference, verdicts.

Import the submodules directly (``guardproxy.guard.engine``, ``.checkpoint``, ``.labels``); this package keeps its
import light so that ``guardproxy.eval.scoring`` and friends do not pull in torch.
"""
