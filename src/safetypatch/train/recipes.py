"""Refusal-SFT recipes: one strict config, the named presets of Mou et al. and Xue & Mirzasoleiman, and Xue's mode
strings (docs/methods.md §3.1 defaults table, §3.2 mode table).

Every default carries its provenance (``paper``, ``code``, ``secondary``, ``ours``) in the field description.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from safetypatch.config import StrictConfig, describe_errors
from safetypatch.errors import ConfigError
from safetypatch.registry import Registry

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                    "inverse_sqrt"]
"""The transformers learning-rate schedulers that run without extra arguments (a test keeps them transformers'),
restated so that building a recipe loads no transformers."""


class RegularizerConfig(StrictConfig):
    """Xue's overlap regulariser L = L_CE + β Σ_modules R (docs/methods.md §3.2; Xue & Mirzasoleiman, arXiv
    2507.17075)."""

    beta: float = Field(0.1, ge=0, description="Weight β of the penalty (not confirmed in the paper; our default).")
    k: int = Field(64, ge=1, description="Top-k singular subspace of W_0 (not confirmed in the paper; our default).")
    side: Literal["column", "row", "both"] = Field(
        "column", description="column: ‖M_c ΔW‖²; row: ‖ΔW M_r‖²; both: ‖M_c ΔW M_r‖² (code default column).")
    weighting: Literal["weighted", "uniform"] = Field(
        "weighted", description="weighted: buffers scaled by S_k; uniform: bare U_k / V_k (code default weighted).")
    normalize: bool = Field(
        True, description="Divide buffers by their norm and R by ‖ΔW‖²+eps (code: off in base mode; ours: on).")
    svd_method: Literal["auto", "exact", "lowrank"] = Field(
        "auto", description="auto: exact up to 8192, seeded svd_lowrank above (ours); lowrank: the reference.")
    modules: tuple[str, ...] = Field(MLP, description="Module names penalised (code: gate, up, down; 'down' variant).")
    eps: float = Field(1e-8, gt=0, description="Added to ‖ΔW‖² when normalising (code).")


class PatchRecipe(StrictConfig):
    """Everything that determines a refusal-SFT patch; saved verbatim in the patch manifest (docs/methods.md §3.1).

    Run options that do not change the result (threads, device, output folder) are not part of a recipe.
    """

    mode: Literal["lora", "full"] = Field("lora", description="LoRA patch, or the full-parameter baseline (§3.1).")
    r: int = Field(8, ge=1, description="LoRA rank (Mou: 8, secondary; Xue: 1 best, code).")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha; s = alpha / r (Xue code: 16).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (Xue code: 0.05).")
    use_rslora: bool = Field(False, description="s = alpha / √r instead of alpha / r (ours; off).")
    target_modules: tuple[str, ...] = Field(
        ALL_LINEAR, description="Module names adapted (ours: q,k,v,o,gate,up,down; Xue: up_proj, paper).")
    layer_range: Literal["middle_third"] | tuple[int, int] | None = Field(
        None, description="None: all layers; [a, b] inclusive; middle_third: ⌊L/3⌋..⌊2L/3⌋−1 (§3.1 step 6).")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate (Xue code: 5e-5).")
    lr_scheduler_type: Scheduler = Field("cosine", description="transformers scheduler name (Xue code: cosine).")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warm-up share of steps (Xue code: 0).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay (Xue code: 1e-4).")
    num_train_epochs: float = Field(3, gt=0, description="Epochs (not confirmed in the paper; our default 3).")
    max_steps: int = Field(-1, description="Stop after this many optimiser steps; -1 = use epochs (ours).")
    per_device_train_batch_size: int = Field(2, ge=1, description="Per-device batch (Xue code: 2).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Gradient accumulation (Xue code: 1).")
    max_length: int = Field(1024, ge=8, description="Token budget; the prompt is cut from the left (ours: 1024).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a bf16 GPU or a CPU with native bf16, else fp16 on a GPU, fp32 on a CPU "
                        "(§3.1: bf16).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations (§3.1: on for full mode).")
    seed: int = Field(0, description="Seed of LoRA init, data order and dropout (ours: 0).")
    think: bool | None = Field(
        None, description="Prefix refusals with a short thinking segment; None: when the template has <think>.")
    refusal_seed: int = Field(0, description="Seed choosing each prompt's refusal text (ours).")
    retain_count: int = Field(0, ge=0, description="Benign prompts answered by the model itself (docs/patches.md).")
    retain_weight: float = Field(1.0, ge=0, description="Loss weight of retain tokens relative to refusals (ours).")
    lead_tokens: int = Field(0, ge=0, description="Leading completion tokens of every example that weigh lead_weight "
                                                  "times more: the refuse-or-answer decision (ours; 0 = off).")
    lead_weight: float = Field(1.0, gt=0, description="Loss factor of the lead_tokens leading tokens (ours).")
    retain_unlikelihood: float = Field(
        0.0, ge=0, description="Weight of −log(1 − p(refusal opening)) at the first completion position of every "
                               "retain example: the first tokens of the training refusals are pushed down on benign "
                               "look-alikes (ours; 0 = off).")
    retain_loss: Literal["ce", "kl"] = Field(
        "ce", description="Loss on the retain answers: ce, cross-entropy on the model's own greedy tokens; kl, "
                          "KL(unpatched ‖ patched) over whole next-token distributions along them (self-distillation; "
                          "LoRA only, one process; ours).")
    representation_weight: float = Field(
        0.0, ge=0, description="Weight λ of the representation term: harmful prompts' hidden states pushed along the "
                               "unpatched model's refusal direction, benign ones kept from moving along it "
                               "(train.representation; ours, 0 = off).")
    representation_layers: tuple[int, ...] | None = Field(
        None, description="Decoder blocks the representation term reads; None: the block at 55 % of the depth "
                          "(16 of SmolLM2's 30).")
    regularizer: RegularizerConfig | None = Field(None, description="Xue's overlap regulariser (§3.2), or none.")

    @model_validator(mode="after")
    def _consistent(self) -> PatchRecipe:
        if self.mode == "full" and self.retain_loss == "kl":
            raise ConfigError("PatchRecipe: retain_loss='kl' distils from the unpatched model by switching the LoRA "
                              "adapter off; the full-parameter mode has no adapter. Set retain_loss='ce' or "
                              "mode='lora'.")
        if self.mode == "full" and self.regularizer is not None:
            raise ConfigError("PatchRecipe: the overlap regulariser acts on LoRA factors; drop `regularizer` or "
                              "set mode='lora'.")
        if isinstance(self.layer_range, tuple) and not 0 <= self.layer_range[0] <= self.layer_range[1]:
            raise ConfigError(f"PatchRecipe: layer_range {list(self.layer_range)} must be [a, b] with 0 ≤ a ≤ b "
                              "(inclusive).")
        if not self.target_modules:
            raise ConfigError("PatchRecipe: target_modules is empty; name at least one module (e.g. up_proj).")
        return self

    def steered_layers(self, num_layers: int) -> tuple[int, ...]:
        """The decoder blocks of the representation term in a model with ``num_layers`` blocks.

        Raises:
            ConfigError: a block outside the model.
        """
        layers = self.representation_layers or (int(0.55 * num_layers),)
        outside = [layer for layer in layers if not 0 <= layer < num_layers]
        if outside:
            raise ConfigError(f"representation_layers {outside} are outside the model's {num_layers} blocks "
                              f"(0..{num_layers - 1}).")
        return tuple(layers)

    def layers(self, num_layers: int) -> list[int] | None:
        """The layer indices to adapt in a model with ``num_layers`` blocks (None = all).

        Raises:
            ConfigError: the range leaves the model's layers.
        """
        if self.layer_range is None:
            return None
        if self.layer_range == "middle_third":
            a, b = num_layers // 3, (2 * num_layers) // 3 - 1
        else:
            a, b = self.layer_range
        if b >= num_layers or a > b:
            raise ConfigError(f"layer_range resolves to [{a}, {b}] but the model has {num_layers} layers "
                              f"(0..{num_layers - 1}); pick a range inside it.")
        return list(range(a, b + 1))


RECIPES: Registry[dict[str, Any]] = Registry("recipe")
# Mou et al.'s patch shape (rank 8, every linear layer) with the budget measured on SmolLM2-135M on 2 CPU cores
# (docs/results/patch-recipes.md): 2 epochs at lr 2e-4, batch 8, no dropout, every self-answered look-alike prompt
# of the retain sets at loss weight 1 with the unlikelihood term on the refusal openings at λ 20, and the first four
# completion tokens (refuse or answer) weighted 3x.
RECIPES.register("mou", {
    "r": 8, "target_modules": ALL_LINEAR, "layer_range": None, "lora_dropout": 0.0, "learning_rate": 2e-4,
    "num_train_epochs": 2.0, "per_device_train_batch_size": 8, "max_length": 256, "retain_count": 1000,
    "retain_weight": 1.0, "retain_unlikelihood": 20.0, "lead_tokens": 4, "lead_weight": 3.0,
})
RECIPES.register("xue", {
    "r": 1, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ("up_proj",), "layer_range": "middle_third",
    "learning_rate": 5e-5, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "weight_decay": 1e-4,
    "num_train_epochs": 10,
})

_MODULE_ONLY = re.compile(r"^lora_(up_proj|down_proj|gate_proj)_only(?:_from(\d+)_to(\d+))?_r(\d+)$")
_GROUP = re.compile(r"^lora_(qkvo_mlp|mlp)_r(\d+)$")
_ORTHOGONAL = re.compile(r"^lora_mlp_orthogonal(?P<flags>(?:_(?:norm|down|uniform|both))*)_r(?P<r>\d+)"
                         r"_beta(?P<beta>[0-9.e-]+)_k(?P<k>\d+)$")


def get_recipe(name: str, **overrides: Any) -> PatchRecipe:
    """A named preset (``mou``, ``xue``) or a Xue mode string, with explicit overrides applied last.

    Args:
        name: a registered preset or a mode string such as ``lora_up_proj_only_from16_to31_r1``.
        **overrides: PatchRecipe fields that win over the preset.

    Returns:
        The validated recipe.

    Raises:
        ConfigError: unknown name (close names suggested) or an invalid field.
    """
    base = parse_mode(name) if name.startswith("lora_") else dict(RECIPES.get(name))
    try:
        return PatchRecipe(**{**base, **overrides})
    except ValidationError as exc:
        raise ConfigError(f"recipe {name!r} with overrides {sorted(overrides)} is invalid: {describe_errors(exc)}") \
            from exc


def parse_mode(mode: str) -> dict[str, Any]:
    """Recipe fields of a Xue & Mirzasoleiman mode string (docs/methods.md §3.1 mode table, §3.2 mode table; ``code``).

    Args:
        mode: e.g. ``lora_qkvo_mlp_r8``, ``lora_mlp_r8``, ``lora_up_proj_only_r1``,
            ``lora_up_proj_only_from16_to31_r1``, ``lora_mlp_orthogonal_norm_r8_beta0.1_k64``.

    Returns:
        A dict of PatchRecipe fields (r, target_modules, layer_range, regularizer).

    Raises:
        ConfigError: the string matches none of the accepted forms.
    """
    if match := _MODULE_ONLY.match(mode):
        module, a, b, r = match.groups()
        layer_range = (int(a), int(b)) if a is not None else None
        return {"r": int(r), "target_modules": (module,), "layer_range": layer_range}
    if match := _GROUP.match(mode):
        group, r = match.groups()
        return {"r": int(r), "target_modules": ALL_LINEAR if group == "qkvo_mlp" else MLP, "layer_range": None}
    if match := _ORTHOGONAL.match(mode):
        flags = set(match["flags"].strip("_").split("_")) - {""}
        regularizer = RegularizerConfig(
            beta=float(match["beta"]), k=int(match["k"]),
            side="both" if "both" in flags else "column",
            weighting="uniform" if "uniform" in flags else "weighted",
            normalize="norm" in flags,
            modules=("down_proj",) if "down" in flags else MLP,
        )
        return {"r": int(match["r"]), "target_modules": MLP, "layer_range": None, "regularizer": regularizer}
    raise ConfigError(
        f"unknown recipe mode {mode!r}. Accepted: lora_qkvo_mlp_r{{r}}, lora_mlp_r{{r}}, "
        "lora_{up_proj,down_proj,gate_proj}_only[_from{a}_to{b}]_r{r}, "
        "lora_mlp_orthogonal[_norm][_down|_uniform][_both]_r{r}_beta{β}_k{k}; or a preset: "
        f"{', '.join(RECIPES.names())}."
    )
