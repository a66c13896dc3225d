"""Xue & Mirzasoleiman's overlap regulariser: penalise the LoRA update's overlap with the top-k singular subspace of
the frozen weight (docs/methods.md §3.2; arXiv 2507.17075, code ``YihaoXue/lora-safety-reasoning``, ``models.py``).

Buffers come from a sign-fixed top-k SVD of W_0 computed once; every forward evaluates the trace forms of §3.2
step 5 from the LoRA factors, so ΔW (d_out × d_in) is never formed. As in the reference, ΔW = B A without the
α/r scale (``include_scaling: false``).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from safetypatch.errors import ConfigError
from safetypatch.train.recipes import RegularizerConfig
from safetypatch.weights.linalg import top_singular

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


class OverlapPenalty(nn.Module):
    """R for one LoRA module: column ‖M_c B A‖², row ‖B A M_r‖², or both ‖M_c B A M_r‖² (docs/methods.md §3.2).

    Args:
        weight: the frozen W_0 (d_out × d_in).
        config: side, weighting, normalisation, k, SVD method.
        seed: seed of the randomised SVD (``svd_method`` lowrank / auto on large matrices).
    """

    def __init__(self, weight: torch.Tensor, config: RegularizerConfig, seed: int = 0) -> None:
        super().__init__()
        self.side = config.side
        self.normalize = config.normalize
        self.eps = config.eps
        svd = top_singular(weight.detach(), config.k, config.svd_method, seed)
        weighted = config.weighting == "weighted"
        column = (svd.S[:, None] * svd.U.T) if weighted else svd.U.T.clone()  # M_c, k × d_out
        row = (svd.V * svd.S[None, :]) if weighted else svd.V.clone()  # M_r, d_in × k
        if self.normalize:
            column = column / torch.linalg.matrix_norm(column).clamp_min(torch.finfo(column.dtype).tiny)
            row = row / torch.linalg.matrix_norm(row).clamp_min(torch.finfo(row.dtype).tiny)
        self.register_buffer("M_c", column if self.side in ("column", "both") else None, persistent=False)
        self.register_buffer("M_r", row if self.side in ("row", "both") else None, persistent=False)

    def forward(self, B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """R for factors B (d_out × r) and A (r × d_in), in fp32, differentiable in B and A."""
        B, A = B.float(), A.float()
        gram_b = B.T @ B  # r × r
        if self.side == "column":
            G = self.M_c @ B  # k × r
            value = ((G @ (A @ A.T)) * G).sum()  # tr(G K Gᵀ)
        elif self.side == "row":
            P = A @ self.M_r  # r × k
            value = (gram_b * (P @ P.T)).sum()  # tr(BᵀB P Pᵀ)
        else:
            value = ((self.M_c @ B) @ (A @ self.M_r)).square().sum()  # ‖G P‖²
        if self.normalize:
            value = value / ((gram_b * (A @ A.T)).sum() + self.eps)  # ‖ΔW‖² = tr(BᵀB A Aᵀ)
        return value


class OverlapRegularizer(nn.Module):
    """Σ_modules R over the LoRA modules of a PEFT model whose name ends with one of ``config.modules``.

    Args:
        peft_model: a PEFT LoRA model (the penalty reads its live factors at every call).
        config: the regulariser config.
        adapter_name: which adapter's factors are penalised.
        seed: seed of randomised SVDs.

    Raises:
        ConfigError: no LoRA module matches ``config.modules``.
    """

    def __init__(self, peft_model: nn.Module, config: RegularizerConfig, adapter_name: str = "default",
                 seed: int = 0) -> None:
        super().__init__()
        self.beta = config.beta
        self.adapter_name = adapter_name
        self._layers: dict[str, Any] = {}
        penalties = {}
        for name, module in peft_model.named_modules():
            short = name.removeprefix(PEFT_PREFIX)
            if adapter_name in getattr(module, "lora_A", {}) and short.rsplit(".", 1)[-1] in config.modules:
                self._layers[short] = module
                penalties[short.replace(".", "__")] = OverlapPenalty(module.get_base_layer().weight, config, seed)
        if not penalties:
            raise ConfigError(f"overlap regulariser: no LoRA module of adapter {adapter_name!r} is named one of "
                              f"{list(config.modules)}; set regularizer.modules to modules the recipe targets.")
        self.penalties = nn.ModuleDict(penalties)
        logger.info("overlap regulariser on %d modules (k=%d, side=%s, %s, normalize=%s)",
                    len(penalties), config.k, config.side, config.weighting, config.normalize)

    def per_module(self) -> dict[str, torch.Tensor]:
        """R of every penalised module, keyed by base-model module name (differentiable)."""
        out = {}
        for name, layer in self._layers.items():
            A = layer.lora_A[self.adapter_name].weight
            B = layer.lora_B[self.adapter_name].weight
            out[name] = self.penalties[name.replace(".", "__")](B, A)
        return out

    def forward(self) -> torch.Tensor:
        """Σ_modules R (unweighted; the trainer multiplies by β)."""
        return torch.stack(list(self.per_module().values())).sum()
