"""Synthetic checkpoints with controlled deltas (docs/methods.md §2.4): base, aligned = base + a known rank-2
perturbation, unsafe = aligned − a known rank-2 safety vector, target = aligned + a small fine-tuning delta; and the
shared method table with its driver (prepare, then restore_tensor)."""

from __future__ import annotations

import torch

from safetypatch.config import load_config
from safetypatch.restoration import METHODS, RestoreContext, RestoredTensor, RestoreMethod
from safetypatch.restoration.lssf import moment_side


def orthonormal(d: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """d × k with orthonormal columns (seeded QR)."""
    Q, _ = torch.linalg.qr(torch.randn(d, k, generator=generator))
    return Q


def rank_k(d_out: int, d_in: int, sigmas: tuple[float, ...], generator: torch.Generator) -> torch.Tensor:
    """U diag(σ) Vᵀ with random orthonormal U, V: a matrix of known rank and spectrum."""
    k = len(sigmas)
    return orthonormal(d_out, k, generator) @ torch.diag(torch.tensor(sigmas)) @ orthonormal(d_in, k, generator).T


def roles(shape: tuple[int, ...] = (12, 8), seed: int = 0) -> dict[str, torch.Tensor]:
    """base / aligned / unsafe / target tensors of one module; 1-D shapes get dense random deltas."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if len(shape) == 2:
        alignment = rank_k(*shape, (3.0, 1.5), g)
        safety = rank_k(*shape, (2.0, 0.5), g)
    else:
        alignment, safety = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    aligned = base + alignment
    target = aligned + 0.1 * torch.randn(shape, generator=g)
    return {"base_model": base, "aligned_model": aligned, "unsafe_model": aligned - safety, "target_model": target}


def activations(d_in: int, n: int = 40, seed: int = 1) -> torch.Tensor:
    """X ∈ ℝ^{d_in×N}: anisotropic random anchor activations."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(2.0, 0.2, d_in).unsqueeze(1)
    return scales * torch.randn(d_in, n, generator=g)


def moment_for(aligned: torch.Tensor, X: torch.Tensor, decompose: str = "weight") -> torch.Tensor:
    """The §3.4 moment of a weight for activations X (X̂ = X / √N): G, or W G Wᵀ on the output side."""
    G = X @ X.T / X.shape[1]
    return G if moment_side(tuple(aligned.shape), decompose) == "input" else aligned @ G @ aligned.T


NAME = "model.layers.0.mlp.up_proj.weight"

CHANGING = [
    ("lssf", {}),
    ("lssf", {"safety_vector": "aligned_minus_base", "alpha_1": 2.0, "eta": 0.5}),
    ("lssf", {"decompose": "safety_vector", "rank_override": 3}),
    ("lssf", {"rank_override": "full", "alpha_1": 1.5}),
    ("resta", {}),
    ("resta", {"dare": True}),
    ("safe_lora", {"num_proj_layers": 1}),
    ("safe_lora", {"select_layers_type": "threshold", "threshold": 2.0}),
    ("safe_lora", {"select_layers_type": "threshold", "threshold": 2.0, "projector": "orthonormal"}),
    ("lox", {}),
    ("lox", {"k": 0}),
    ("lox", {"k": 1, "apply_to": "target"}),
    ("lox", {"k": 2, "svd": "lowrank"}),
]
IDENTITY = [
    ("lssf", {"alpha": 0.0}),
    ("resta", {"beta": 0.0}),
    ("resta", {"beta": 0.0, "dare": True, "drop_p": 0.0}),
    ("safe_lora", {"select_layers_type": "threshold", "threshold": 0.0}),
    ("safe_lora", {"num_proj_layers": 0}),
    ("lox", {"coef": 0.0}),
]


def build(name: str, overrides: dict) -> RestoreMethod:
    """A registered method with its config built the way YAML and flags build it."""
    cls = METHODS.get(name)
    return cls(load_config(cls.config_class, overrides=overrides))


def run(method: RestoreMethod, tensors: dict[str, torch.Tensor], name: str = NAME) -> RestoredTensor:
    """prepare (with an LSSF moment and a one-tensor stream) then restore_tensor."""
    aligned = tensors["aligned_model"].float()
    statistics = {}
    if method.name == "lssf" and aligned.dim() == 2:
        statistics[name] = moment_for(aligned, activations(aligned.shape[1]), method.config.decompose)
    names = (name,) if aligned.dim() == 2 else ()
    context = RestoreContext(names=names, statistics=statistics, tensors=lambda: iter([(name, tensors)]))
    return method.restore_tensor(name, tensors, method.prepare(context))
