"""Delta-to-LoRA extraction (docs/methods.md §3.3 ``svd``, §2.4 tolerances): exactness at full rank and on low-rank
deltas, monotone error, the U_r S_r V_rᵀ convention, and recovery of a known perturbation from two checkpoints."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from safetypatch.errors import ConfigError, PatchError
from safetypatch.patch.artifact import PatchManifest, save_patch
from safetypatch.patch.extract import extract_from_checkpoints, extract_lora
from safetypatch.patch.probe import peft_attached, probe_input_ids, probe_logits
from safetypatch.weights.stream import CheckpointReader, CheckpointWriter
from tests.tiny import build_tiny_model

RTOL, ATOL = 1e-5, 1e-6
PERTURBED = ("model.layers.1.mlp.up_proj", "model.layers.2.self_attn.q_proj")


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_full_rank_reconstructs_the_delta_exactly():
    deltas = {"a.q_proj": _random(12, 8), "b.up_proj": _random(6, 10, seed=1)}
    result = extract_lora(deltas, rank=10)
    for name, delta in deltas.items():
        torch.testing.assert_close(result.patch.delta(name), delta, rtol=RTOL, atol=ATOL)
        assert result.errors[name] < 1e-6
    assert result.error < 1e-6 and result.patch.rank == 10


def test_a_rank_r_delta_is_exact_at_rank_r():
    delta = _random(16, 3) @ _random(3, 12, seed=1)
    result = extract_lora({"m.down_proj": delta}, rank=3)
    torch.testing.assert_close(result.patch.delta("m.down_proj"), delta, rtol=RTOL, atol=1e-5)
    assert result.errors["m.down_proj"] < 1e-5


def test_error_does_not_increase_with_rank():
    delta = _random(20, 14)
    errors = [extract_lora({"m.o_proj": delta}, rank=r).error for r in range(1, 15)]
    assert all(later <= earlier + 1e-7 for earlier, later in itertools.pairwise(errors))
    assert errors[0] > 0.3 and errors[-1] < 1e-6


def test_the_patch_delta_is_the_truncated_svd_with_unit_scaling():
    delta = _random(10, 7)
    rank = 3
    result = extract_lora({"m.gate_proj": delta}, rank=rank)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    expected = U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank]
    torch.testing.assert_close(result.patch.delta("m.gate_proj"), expected, rtol=RTOL, atol=ATOL)
    assert result.patch.config["lora_alpha"] == rank and result.patch.scaling == 1.0
    factors = result.patch.factors["m.gate_proj"]
    torch.testing.assert_close(factors.B.norm(dim=0) ** 2, S[:rank], rtol=RTOL, atol=ATOL)  # B = U_r S_r^½
    torch.testing.assert_close(factors.A.norm(dim=1) ** 2, S[:rank], rtol=RTOL, atol=ATOL)  # A = S_r^½ V_rᵀ
    residual = torch.linalg.matrix_norm(delta - expected) / torch.linalg.matrix_norm(delta)
    assert result.errors["m.gate_proj"] == pytest.approx(float(residual), rel=1e-4)


def test_overall_error_pools_squared_residuals_and_skips_zero_deltas():
    deltas = {"a.q_proj": _random(8, 8), "b.k_proj": 3 * _random(8, 8, seed=1), "c.v_proj": torch.zeros(8, 8)}
    result = extract_lora(iter(deltas.items()), rank=2)
    assert result.patch.modules == ["a.q_proj", "b.k_proj"] and result.unchanged == ("c.v_proj",)
    norms = {n: float(torch.linalg.matrix_norm(deltas[n])) for n in result.errors}
    pooled = math.sqrt(sum((result.errors[n] * norms[n]) ** 2 for n in norms) / sum(v**2 for v in norms.values()))
    assert result.error == pytest.approx(pooled, rel=1e-9)
    assert min(result.errors.values()) <= result.error <= max(result.errors.values())
    assert result.patch.manifest["errors"] == result.errors


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="rank must be ≥ 1"):
        extract_lora({"m.q_proj": _random(4, 4)}, rank=0)
    with pytest.raises(ConfigError, match=r"'m\.q_proj\.weight' is a tensor name; give the module name 'm\.q_proj'"):
        extract_lora({"m.q_proj.weight": _random(4, 4)}, rank=2)
    with pytest.raises(PatchError, match=r"ΔW of m\.norm has shape \(4,\)"):
        extract_lora({"m.norm": torch.ones(4)}, rank=2)
    with pytest.raises(PatchError, match="appears twice"):
        extract_lora([("m.q_proj", _random(4, 4)), ("m.q_proj", _random(4, 4))], rank=2)
    with pytest.raises(PatchError, match="NaN or Inf"):
        extract_lora({"m.q_proj": torch.full((4, 4), float("inf"))}, rank=2)
    with pytest.raises(PatchError, match="zero in all 1 modules"):
        extract_lora({"m.q_proj": torch.zeros(4, 4)}, rank=2)


@pytest.fixture(scope="module")
def perturbed_pair(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(target, reference, perturbations): target = the tiny llama + a known rank-2 ΔW in two modules."""
    root = tmp_path_factory.mktemp("extract")
    model, tok = build_tiny_model("llama")
    reference = root / "reference"
    model.save_pretrained(reference)
    tok.save_pretrained(reference)
    reader = CheckpointReader(reference)
    perturbations = {}
    with CheckpointWriter(root / "target", template=reference) as writer:
        for seed, module in enumerate(PERTURBED):
            weight = reader.get(f"{module}.weight")
            d_out, d_in = weight.shape
            perturbations[module] = 0.1 * _random(d_out, 2, seed=seed) @ _random(2, d_in, seed=seed + 10)
            writer.add(f"{module}.weight", weight + perturbations[module])
        writer.finish()
    return root / "target", reference, perturbations


def test_extraction_from_checkpoints_recovers_exactly_the_perturbed_modules(perturbed_pair):
    target, reference, perturbations = perturbed_pair
    result = extract_from_checkpoints(target, reference, rank=2)
    assert result.patch.modules == sorted(PERTURBED)
    assert len(result.unchanged) == 4 * 7 - len(PERTURBED)
    for module, delta in perturbations.items():
        torch.testing.assert_close(result.patch.delta(module), delta, rtol=RTOL, atol=1e-6)
        assert result.errors[module] < 1e-5
    assert result.patch.manifest["target"] == str(target) and result.patch.manifest["reference"] == str(reference)


def test_the_extracted_patch_turns_the_reference_into_the_target(perturbed_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    target, reference, _ = perturbed_pair
    result = extract_from_checkpoints(target, reference, rank=2)
    reference_model = AutoModelForCausalLM.from_pretrained(reference).eval()
    target_model = AutoModelForCausalLM.from_pretrained(target).eval()
    saved = save_patch(result.patch, tmp_path / "patch", PatchManifest(method="extract:svd"), model=reference_model)
    ids = probe_input_ids(reference_model)
    with peft_attached(reference_model, saved) as patched:
        torch.testing.assert_close(probe_logits(patched, ids), probe_logits(target_model, ids), rtol=1e-4, atol=1e-5)
