"""Streaming the modules of an analysis from tiny checkpoints on disk (docs/methods.md §2.4, §3.8, §5.2): the streamed
two-checkpoint path and the LoRA-factor path equal the in-memory computation, the W_0 SVD cache is exact, and
patches or checkpoints that do not fit the model are refused with the file and tensor named."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from safetypatch.analysis.cache import ReferenceCache, cache_folder
from safetypatch.analysis.metrics import Delta, Reference, lox_metrics, spectral_metrics, subspace_metrics
from safetypatch.analysis.modules import (
    BASE,
    MODEL,
    TARGET,
    analyze_modules,
    checkpoint_inputs,
    checkpoint_tensor_names,
    patch_inputs,
    patch_tensor_names,
)
from safetypatch.analysis.settings import SubspaceSettings
from safetypatch.errors import ModelError, ModelMismatchError
from safetypatch.patch.factors import Patch
from safetypatch.weights.stream import CheckpointReader
from tests.patch.helpers import random_patch
from tests.tiny import build_tiny_model

SETTINGS = SubspaceSettings(rank=4, k=16, lox_k=8, baseline_draws=2)
SCALARS = ("norm", "relative_norm", "stable_rank", "mou_max", "mou_top1", "mou_fro", "mou_norm", "angle_row_min_deg",
           "sin_theta_row", "angle_col_min_deg", "sin_theta_col", "overlap", "overlap_weighted", "overlap_row",
           "enrichment")


def _save(model, tokenizer, folder: Path) -> Path:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """model; target = model + a rank-3 delta in every linear weight; base = model − a rank-2 delta."""
    root = tmp_path_factory.mktemp("checkpoints")
    model, tokenizer = build_tiny_model("llama")
    folders = {MODEL: _save(model, tokenizer, root / MODEL)}
    generator = torch.Generator().manual_seed(0)
    for role, rank, sign in ((TARGET, 3, 1.0), (BASE, 2, -1.0)):
        changed, _ = build_tiny_model("llama")
        with torch.no_grad():
            for name, param in changed.named_parameters():
                if name.endswith("_proj.weight"):
                    d_out, d_in = param.shape
                    low = torch.randn(d_out, rank, generator=generator) @ torch.randn(rank, d_in, generator=generator)
                    param.add_(sign * 0.05 * low)
        folders[role] = _save(changed, tokenizer, root / role)
    return folders


def _readers(checkpoints: dict[str, Path], *roles: str) -> dict[str, CheckpointReader]:
    return {role: CheckpointReader(checkpoints[role]) for role in roles}


def _state(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.get(name).float() for name in reader.names()}


def _no_cache() -> ReferenceCache:
    return ReferenceCache(None, max(SETTINGS.r, SETTINGS.k), SETTINGS.svd_method, SETTINGS.seed)


def test_the_streamed_two_checkpoint_path_equals_the_in_memory_computation(checkpoints):
    readers = _readers(checkpoints, MODEL, TARGET, BASE)
    names = checkpoint_tensor_names(readers)
    rows = analyze_modules(checkpoint_inputs(readers, names, SETTINGS), len(names), _no_cache(), SETTINGS)
    model, target, base = (_state(checkpoints[role]) for role in (MODEL, TARGET, BASE))
    assert [row["tensor"] for row in rows] == names and len(names) == 4 * 7
    for row in rows[:7]:
        W, T = model[row["tensor"]], target[row["tensor"]]
        ref = Reference.of(W, 16, "exact", 0)
        delta = Delta.from_matrix(T - W, 16, "exact", 0)
        expected = {**spectral_metrics(ref, delta, 0.9), **subspace_metrics(ref, delta, SETTINGS),
                    **lox_metrics(W - base[row["tensor"]], T - W, 8, "exact", 0)}
        for key in (*SCALARS, "r_align", "r_ft", "entropy_rank"):
            assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), (row["tensor"], key)
        assert row["stable_rank"] == pytest.approx(float(torch.linalg.matrix_norm(T - W) ** 2
                                                         / torch.linalg.matrix_norm(T - W, ord=2) ** 2), rel=1e-4)
    assert all(row["stable_rank"] <= 3.0 + 1e-4 for row in rows)  # the target's delta is rank 3


def test_the_lora_factor_path_equals_the_dense_product(checkpoints):
    model, _ = build_tiny_model("llama")
    patch = random_patch(model, modules=("q_proj", "down_proj"), r=3, scale=0.3)
    readers = _readers(checkpoints, MODEL)
    names = patch_tensor_names(patch, readers[MODEL])
    rows = analyze_modules(patch_inputs(patch, readers, names), len(names), _no_cache(), SETTINGS)
    weights = _state(checkpoints[MODEL])
    assert len(rows) == 8
    for row in rows:
        W = weights[row["tensor"]]
        ref = Reference.of(W, 16, "exact", 0)
        delta = Delta.from_matrix(patch.delta(row["tensor"].removesuffix(".weight")), 16, "exact", 0)
        expected = {**spectral_metrics(ref, delta, 0.9), **subspace_metrics(ref, delta, SETTINGS)}
        for key in (*SCALARS, "rank", "entropy_rank"):
            assert row[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-4), (row["tensor"], key)
        assert row["r"] == 3 and len(row["spectrum"]) == 3 and row["spectrum_complete"] is True  # r = the rank, not 4


def test_a_zero_lora_update_gets_a_row_without_directions(checkpoints):
    model, _ = build_tiny_model("llama")
    patch = random_patch(model, modules=("up_proj",), r=2)
    zero = Patch(config=patch.config, factors={m: type(f)(A=f.A, B=torch.zeros_like(f.B))
                                               for m, f in patch.factors.items()})
    readers = _readers(checkpoints, MODEL)
    names = patch_tensor_names(zero, readers[MODEL])
    rows = analyze_modules(patch_inputs(zero, readers, names), len(names), _no_cache(), SETTINGS)
    assert all(row["zero"] and row["norm"] == 0.0 and "mou_norm" not in row and "baseline" not in row for row in rows)


def test_the_w0_svd_cache_is_filled_once_and_read_back_exactly(checkpoints, tmp_path):
    readers = _readers(checkpoints, MODEL, TARGET)
    names = checkpoint_tensor_names(readers)[:5]
    folder = cache_folder("f" * 64, 16, "auto", 0, root=tmp_path)
    first_cache, second_cache = (ReferenceCache(folder, 16, "auto", 0) for _ in range(2))
    first = analyze_modules(checkpoint_inputs(readers, names, SETTINGS), 5, first_cache, SETTINGS)
    second = analyze_modules(checkpoint_inputs(readers, names, SETTINGS), 5, second_cache, SETTINGS)
    assert (first_cache.misses, first_cache.hits, second_cache.misses, second_cache.hits) == (5, 0, 0, 5)
    assert len(list(folder.glob("*.safetensors"))) == 5
    assert first == second


def test_a_stale_cache_entry_is_refused_with_the_fix(checkpoints, tmp_path):
    readers = _readers(checkpoints, MODEL)
    cache = ReferenceCache(tmp_path / "entry", 16, "auto", 0)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    cache.get(q, readers[MODEL].get(q).float())
    (tmp_path / "entry" / f"{q}.safetensors").rename(tmp_path / "entry" / f"{k}.safetensors")
    with pytest.raises(ModelError, match=r"stale. Delete .*entry and run again"):
        cache.get(k, readers[MODEL].get(k).float())


def test_a_patch_for_another_architecture_is_refused(checkpoints):
    model, _ = build_tiny_model("qwen2")
    patch = random_patch(model, modules=("up_proj",), manifest={"base_model": {"arch": {"model_type": "qwen2"}}})
    with pytest.raises(ModelMismatchError, match=r"trained for a qwen2 model, but .* is a llama model.*--model"):
        patch_tensor_names(patch, CheckpointReader(checkpoints[MODEL]))


def test_a_patch_with_modules_or_shapes_the_model_lacks_is_refused(checkpoints, tmp_path):
    deep, _ = build_tiny_model("llama", num_layers=6)
    patch = random_patch(deep, modules=("up_proj",))
    with pytest.raises(ModelMismatchError, match=r"adapts model\.layers\.4\.mlp\.up_proj, but .* has no tensor "
                                                 r"model\.layers\.4\.mlp\.up_proj\.weight"):
        patch_tensor_names(patch, CheckpointReader(checkpoints[MODEL]))
    factors = {m: type(f)(A=f.A[:, :32], B=f.B) for m, f in random_patch(build_tiny_model()[0]).factors.items()}
    narrow = Patch(config=patch.config, factors=factors, folder=tmp_path / "narrow-patch")
    with pytest.raises(ModelMismatchError, match=r"narrow-patch/adapter_model\.safetensors, module "
                                                 r"model\.layers\.0\.mlp\.up_proj: the patch's ΔW is \(128, 32\) but "
                                                 r".* stores model\.layers\.0\.mlp\.up_proj\.weight as \(128, 64\)"):
        patch_tensor_names(narrow, CheckpointReader(checkpoints[MODEL]))


def test_checkpoints_of_different_shapes_are_refused_before_any_work(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_config

    config = make_config("llama")
    config.intermediate_size = 96
    _save(AutoModelForCausalLM.from_config(config), build_tiny_model()[1], tmp_path / "other")
    readers = {MODEL: CheckpointReader(checkpoints[MODEL]), TARGET: CheckpointReader(tmp_path / "other")}
    names = checkpoint_tensor_names(readers)
    with pytest.raises(ModelMismatchError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: model has "
                                                 r"\(64, 128\), target has \(64, 96\)"):
        next(checkpoint_inputs(readers, names, SETTINGS))


def test_a_missing_checkpoint_folder_is_named(tmp_path):
    with pytest.raises(ModelError, match=r"nowhere is not a folder"):
        CheckpointReader(tmp_path / "nowhere")
