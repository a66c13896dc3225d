"""The settings every analysis metric reads (docs/methods.md §3.8): subspace depths, entropy threshold, random
baseline, SVD routine and seed. ``safetypatch analyze``'s config extends them with its inputs and outputs."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from safetypatch.config import StrictConfig

DEFAULT_CHECKPOINT_RANK = 8
"""r of Mou's similarity for a checkpoint delta: the rank of the paper's analysis (§3.8, ``secondary``)."""


class SubspaceSettings(StrictConfig):
    """How deep each subspace is and how the random baseline is drawn (docs/methods.md §3.2, §3.4, §3.7, §3.8)."""

    rank: int | None = Field(
        None, ge=1, description="r of Mou's similarity S = V_Δ,rᵀ V_0,r and of the principal angles; default the "
        f"adapter's rank, or {DEFAULT_CHECKPOINT_RANK} for a checkpoint delta (§3.8: the same r for full-FT deltas).")
    k: int = Field(64, ge=1, description="k of Xue's overlap O_k = ‖U_kᵀΔW‖_F/‖ΔW‖_F, U_k the top-k left singular "
                                         "vectors of W_0 (§3.8 default 64).")
    eta: float = Field(0.9, gt=0, le=1, description="η of the LSSF entropy rank of ΔW's spectrum (§3.4 default 0.9).")
    lox_k: int = Field(100, ge=1, description="k of LoX's R_align / R_ft (§3.7 reference script: 100); used with "
                                              "base_model.")
    baseline_draws: int = Field(8, ge=1, description="Random ΔW drawn per module for the baseline: same spectrum "
                                                     "(rank, norm), Haar-random singular vectors.")
    baseline_quantile: float = Field(0.95, gt=0, lt=1, description="High quantile of the baseline draws reported "
                                                                  "next to their mean.")
    svd_method: Literal["auto", "exact", "lowrank"] = Field(
        "auto", description="SVD of W_0, of a checkpoint ΔW and of ΔW_align: exact up to 8192 rows/columns, seeded "
        "torch.svd_lowrank above (auto); a LoRA ΔW is always decomposed exactly from its factors.")
    seed: int = Field(0, description="Seed of the randomised SVDs and of the baseline draws.")

    def resolved(self, adapter_rank: int | None) -> SubspaceSettings:
        """A copy whose ``rank`` is set: the configured rank, else the adapter's, else the checkpoint default."""
        return self.model_copy(update={"rank": self.rank or adapter_rank or DEFAULT_CHECKPOINT_RANK})

    @property
    def r(self) -> int:
        """Mou's r (the checkpoint default while ``rank`` is unresolved)."""
        return self.rank or DEFAULT_CHECKPOINT_RANK
