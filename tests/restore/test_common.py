"""The shared invariant table every registered restoration method runs (docs/methods.md §2.3–§2.4)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from safetypatch.config import load_config
from safetypatch.errors import ConfigError, ModelMismatchError
from safetypatch.restoration import METHODS, ROLES, RestoreContext, RestoreMethod
from tests.restore.helpers import CHANGING, IDENTITY, build, roles, run

NAME = "model.layers.0.mlp.up_proj.weight"
SHAPES = [(12, 8), (8, 12)]  # d_in < d_out (input-side moment) and d_in > d_out (output-side moment)


def test_registry_names_classes_and_configs():
    assert METHODS.names() == ["lox", "lssf", "resta", "safe_lora"]
    for key in METHODS:
        cls = METHODS.get(key)
        method = cls()
        assert issubclass(cls, RestoreMethod) and cls.name == key
        assert cls.paper.startswith("https://arxiv.org/abs/")
        assert set(method.roles) <= set(ROLES) and "aligned_model" in method.roles
        assert method.scope == ("all_2d" if key == "lox" else "linear")
        for field_name, info in cls.config_class.model_fields.items():
            assert info.description, f"{key}.{field_name} has no description"


def test_callers_ask_what_a_method_declares_never_its_class():
    package = Path(METHODS.get("lssf").__module__.replace(".", "/")).parent
    src = Path(__file__).resolve().parents[2] / "src"
    callers = [*sorted((src / "safetypatch" / "api").glob("*.py")), src / package / "runner.py"]
    classes = "|".join(METHODS.get(key).__name__ for key in METHODS)
    found = [f"{path.name}: {match.group(0)}" for path in callers
             for match in re.finditer(rf"isinstance\([^)]*\b({classes})\b", path.read_text())]
    assert not found, found
    assert [key for key in METHODS if METHODS.get(key).needs_anchors] == ["lssf"]
    assert [key for key in METHODS if METHODS.get(key).repairs_adapters] == ["safe_lora"]


def test_registry_and_configs_refuse_unknown_names():
    with pytest.raises(ConfigError, match="Did you mean 'lssf'"):
        METHODS.get("lsf")
    with pytest.raises(ConfigError, match="gamma"):
        load_config(METHODS.get("resta").config_class, overrides={"gamma": 0.5})
    with pytest.raises(ConfigError, match="takes a LoXConfig"):
        METHODS.get("lox")(METHODS.get("resta").config_class())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("name", "overrides"), CHANGING)
def test_output_is_fp32_finite_of_the_input_shape_and_inputs_are_untouched(name, overrides, shape):
    tensors = {role: t.to(torch.bfloat16) for role, t in roles(shape).items()}
    before = {role: t.clone() for role, t in tensors.items()}
    method = build(name, overrides)
    result = run(method, tensors)
    assert result.tensor is not None, f"{name} {overrides} changed nothing"
    assert result.tensor.shape == shape and result.tensor.dtype == torch.float32
    assert bool(torch.isfinite(result.tensor).all())
    changed = "aligned_model" if name == "lox" and overrides.get("apply_to") != "target" else "target_model"
    assert not torch.equal(result.tensor, tensors[changed].float())
    assert all(torch.equal(tensors[role], before[role]) for role in tensors)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("name", "overrides"), IDENTITY)
def test_zero_strength_is_the_identity_before_any_arithmetic(name, overrides, shape):
    """§2.3: identity cases return None (the input tensor is written unchanged, never cast)."""
    result = run(build(name, overrides), roles(shape))
    assert result.tensor is None and "skipped" in result.report


@pytest.mark.parametrize("name", ["lssf", "safe_lora", "lox"])
def test_matrix_methods_leave_1d_tensors_alone(name):
    result = run(build(name, {"select_layers_type": "threshold"} if name == "safe_lora" else {}),
                 roles((12,)), "model.norm.weight")
    assert result.tensor is None


def test_missing_roles_and_shape_mismatches_are_named():
    tensors = roles()
    method = build("resta", {})
    with pytest.raises(ConfigError, match=r"lacks role.*unsafe_model"):
        method.restore_tensor(NAME, {k: v for k, v in tensors.items() if k != "unsafe_model"}, RestoreContext())
    tensors["target_model"] = tensors["target_model"][:, :4]
    with pytest.raises(ModelMismatchError, match=f"{NAME}.*target_model: \\(12, 4\\)"):
        method.restore_tensor(NAME, tensors, RestoreContext())
