"""Reference forward of a Qwen3Guard-Stream checkpoint through transformers' own ``Qwen3Model``.

This is the yardstick for parity tests and the baseline of the benchmark: one plain full-sequence forward of the
stock transformers backbone, then the two head pathways applied at every position, as the Qwen3Guard technical
report (arXiv 2510.14276) describes them. It never uses ``trust_remote_code``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from guardproxy.testing.checkpoint_format import QUERY_HEAD, RESPONSE_HEAD


class ReferenceGuard:
    """transformers ``Qwen3Model`` + guard heads, loaded from a local checkpoint directory.

    Args:
        path: checkpoint directory (``config.json`` + ``*.safetensors``, sharded or not).
        dtype: compute dtype (float32 for parity).
    """

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        from safetensors.torch import load_file
        from transformers import Qwen3Config, Qwen3Model

        path = Path(path)
        self.config = json.loads((path / "config.json").read_text())
        cfg = {k: v for k, v in self.config.items() if not k.endswith("_map")}
        qc = Qwen3Config(**cfg)
        qc._attn_implementation = "eager"
        sd: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        self.backbone = Qwen3Model(qc).to(dtype).eval()
        self.backbone.load_state_dict({k[len("model."):]: v.to(dtype) for k, v in sd.items() if k.startswith("model.")})
        self.heads = {n: sd[n + ".weight"].to(dtype) for n in RESPONSE_HEAD + QUERY_HEAD}
        self.eps = float(self.config["rms_norm_eps"])
        self.dtype = dtype

    def _head(self, h: torch.Tensor, names: tuple[str, str, str, str]) -> tuple[torch.Tensor, torch.Tensor]:
        pre, ln, risk, cat = names
        x = h @ self.heads[pre].T
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.heads[ln]
        return x @ self.heads[risk].T, x @ self.heads[cat].T

    @torch.no_grad()
    def logits(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Full-sequence forward of ``ids`` (length T).

        Returns:
            dict with ``risk`` [T, num_risk_level], ``category`` [T, num_category] (response heads) and
            ``query_risk`` [T, num_query_risk_level], ``query_category`` [T, num_query_category] (prompt heads),
            float32 logits at every position.
        """
        x = torch.tensor([ids], dtype=torch.long)
        h = self.backbone(input_ids=x).last_hidden_state[0]
        risk, cat = self._head(h, RESPONSE_HEAD)
        qrisk, qcat = self._head(h, QUERY_HEAD)
        return {"risk": risk.float(), "category": cat.float(), "query_risk": qrisk.float(), "query_category": qcat.float()}

    def stream_reference(self, prompt_ids: list[int], response_ids: list[int]) -> list[torch.Tensor]:
        """The official streaming algorithm: after the prompt, every new token re-runs the WHOLE sequence
        (QwenLM/Qwen3Guard issue #22). Returns the response-head risk logits of each new token. O(T^2): baseline only.
        """
        out = []
        seq = list(prompt_ids)
        for t in response_ids:
            seq.append(t)
            out.append(self.logits(seq)["risk"][-1])
        return out
