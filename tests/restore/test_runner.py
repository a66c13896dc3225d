"""The restoration runner on synthetic tiny checkpoints (docs/methods.md §2.4): base; aligned = base + a known rank-2
perturbation in a few modules; unsafe = aligned − that perturbation; target = aligned + a benign perturbation (every
linear weight, and one norm). Outputs are read back from disk and compared with closed forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from safetypatch.errors import ConfigError, ModelError, ModelMismatchError, OutputExistsError
from safetypatch.models.fingerprint import fingerprint_folder
from safetypatch.patch import PatchManifest, load_patch, save_patch
from safetypatch.restoration.resta import RESTA, RESTAConfig
from safetypatch.restoration.runner import PROVENANCE_FILE, REPORT_FILE, run_restore
from safetypatch.restoration.safe_lora import align
from safetypatch.weights import elementwise
from safetypatch.weights.stream import CheckpointReader, select_names
from tests.patch.helpers import random_patch
from tests.restore.helpers import build
from tests.tiny import build_tiny_model, make_config

SAFETY_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.3.mlp.up_proj")
CHANGED_NORM = "model.layers.2.input_layernorm.weight"


def write_roles(root: Path) -> dict[str, Path]:
    """base, aligned, unsafe and target folders of the tiny llama (fp32, written with save_pretrained)."""
    model, tokenizer = build_tiny_model("llama")
    generator = torch.Generator().manual_seed(0)

    def save(role: str) -> Path:
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)
        return root / role

    def rank2(weight: torch.Tensor) -> torch.Tensor:
        d_out, d_in = weight.shape
        return 0.2 * torch.randn(d_out, 2, generator=generator) @ torch.randn(2, d_in, generator=generator)

    folders = {"base_model": save("base_model")}
    with torch.no_grad():
        safety = {m: rank2(model.get_submodule(m).weight) for m in SAFETY_MODULES}
        for module, delta in safety.items():
            model.get_submodule(module).weight.add_(delta)
        aligned = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        folders["aligned_model"] = save("aligned_model")
        for module, delta in safety.items():
            model.get_submodule(module).weight.copy_(aligned[f"{module}.weight"] - delta)
        folders["unsafe_model"] = save("unsafe_model")
        model.load_state_dict(aligned)
        for name, param in model.named_parameters():
            if name.endswith("_proj.weight"):
                param.add_(0.01 * torch.randn(param.shape, generator=generator))
        model.get_parameter(CHANGED_NORM).add_(0.1)
        folders["target_model"] = save("target_model")
    return folders


@pytest.fixture(scope="module")
def roles(tmp_path_factory) -> dict[str, Path]:
    return write_roles(tmp_path_factory.mktemp("roles"))


@pytest.fixture(scope="module")
def bf16_target(roles, tmp_path_factory) -> Path:
    """The target stored in bfloat16 (the other roles stay fp32)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path_factory.mktemp("bf16") / "target_model"
    AutoModelForCausalLM.from_pretrained(roles["target_model"]).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _pick(roles: dict[str, Path], method, **replace: Path) -> dict[str, Path]:
    return {role: replace.get(role, roles[role]) for role in method.roles}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.names()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resta_writes_target_plus_beta_safety_vector_and_copies_the_rest(roles, bf16_target, tmp_path, dtype):
    method = build("resta", {"beta": 0.5})
    target = roles["target_model"] if dtype == torch.float32 else bf16_target
    run = run_restore(method, _pick(roles, method, target_model=target), tmp_path / "out")
    out, want = _tensors(tmp_path / "out"), _tensors(target)
    A, U = _tensors(roles["aligned_model"]), _tensors(roles["unsafe_model"])
    linear = set(select_names(CheckpointReader(target), "linear"))
    assert len(linear) == 28 and out.keys() == want.keys()
    for name, tensor in out.items():
        assert tensor.dtype == dtype, name
        if name in linear:
            expected = (want[name].float() + 0.5 * (A[name] - U[name])).to(dtype).float()
            torch.testing.assert_close(tensor.float(), expected, rtol=torch.finfo(dtype).eps, atol=1e-6)
        else:
            assert torch.equal(tensor, want[name]), f"{name} (not in scope) changed"
    summary = run.report.summary()
    assert summary["tensors"] == 28 and summary["changed"] == len(SAFETY_MODULES)
    assert summary["skipped"] == {"δ_safe = 0": 28 - len(SAFETY_MODULES)}
    assert run.kind == "model" and run.output == tmp_path / "out" and not run.dry_run


class _ReferenceRESTA(RESTA):
    """RESTA without its chunked form: the runner falls back to restore_tensor on fp32 copies."""

    def restore_chunked(self, name, tensors, context):
        return None


@pytest.mark.parametrize("config", [{"beta": 0.5}, {"beta": 0.75, "dare": True, "drop_p": 0.3}])
def test_the_chunked_run_writes_the_bytes_and_report_of_the_reference_run(roles, bf16_target, tmp_path, monkeypatch,
                                                                          config):
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", 1000)  # 8192- and 4096-element weights: short last chunks
    picked = {**_pick(roles, RESTA()), "target_model": bf16_target}
    chunked = run_restore(RESTA(RESTAConfig(**config)), picked, tmp_path / "chunked")
    reference = run_restore(_ReferenceRESTA(RESTAConfig(**config)), picked, tmp_path / "reference")
    assert chunked.report.rows == reference.report.rows
    for file in ("model.safetensors", REPORT_FILE):
        assert (tmp_path / "chunked" / file).read_bytes() == (tmp_path / "reference" / file).read_bytes(), file


def test_a_non_finite_result_fails_the_run_as_before_and_writes_nothing(roles, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(roles["target_model"])
    name = f"{SAFETY_MODULES[1]}.weight"
    with torch.no_grad():
        model.get_parameter(name).view(-1)[-1] = float("inf")
    model.save_pretrained(tmp_path / "target_inf")
    picked = {**_pick(roles, RESTA()), "target_model": tmp_path / "target_inf"}
    for method, out in ((RESTA(), "chunked"), (_ReferenceRESTA(), "reference")):
        with pytest.raises(ModelError, match=rf"tensor {name} for .*{out} contains NaN or Inf as torch\.float32"):
            run_restore(method, picked, tmp_path / out)
        assert not (tmp_path / out).exists()


def test_the_report_and_provenance_are_written_next_to_the_weights(roles, tmp_path):
    method = build("resta", {"beta": 0.25})
    run_restore(method, _pick(roles, method), tmp_path / "out", meta={"models": {"aligned_model": "a"}})
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    record = json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())
    assert report["method"] == record["method"] == "resta" and record["config"]["beta"] == 0.25
    assert [row["layer"] for row in report["layers"]] == sorted(row["layer"] for row in report["layers"])
    changed = {row["tensor"] for row in report["layers"] if row["changed"]}
    assert changed == {f"{m}.weight" for m in SAFETY_MODULES}
    for role in method.roles:
        assert record["roles"][role]["sha256"] == fingerprint_folder(roles[role]).sha256
    assert record["meta"] == {"models": {"aligned_model": "a"}} and record["scope"] == "linear"
    assert record["seconds"] >= 0 and record["library_versions"]["torch"]
    assert (tmp_path / "out" / "tokenizer.json").is_file() and (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize(("name", "overrides", "template"), [
    ("safe_lora", {"select_layers_type": "threshold", "threshold": 0.0}, "target_model"),
    ("safe_lora", {"num_proj_layers": 0}, "target_model"),
    ("lox", {"coef": 0.0}, "aligned_model"),
    ("resta", {"beta": 0.0}, "target_model"),
])
def test_zero_strength_writes_the_template_bit_for_bit(roles, tmp_path, name, overrides, template):
    method = build(name, overrides)
    run = run_restore(method, _pick(roles, method), tmp_path / "out")
    out, want = _tensors(tmp_path / "out"), _tensors(roles[template])
    assert out.keys() == want.keys()
    assert all(torch.equal(out[n], want[n]) for n in want)
    assert run.report.summary()["changed"] == 0


def test_safe_lora_number_mode_ranks_every_module_before_projecting_one(roles, tmp_path):
    method = build("safe_lora", {"num_proj_layers": 1})
    run = run_restore(method, _pick(roles, method), tmp_path / "out")
    rows = {row["tensor"]: row for row in run.report.rows if "cosine" in row}
    assert set(rows) == {f"{m}.weight" for m in SAFETY_MODULES}  # V = 0 elsewhere
    lowest = min(rows, key=lambda n: rows[n]["cosine"])
    assert [n for n, row in rows.items() if row["projected"]] == [lowest]
    out, B, A, T = (_tensors(tmp_path / "out"), _tensors(roles["base_model"]), _tensors(roles["aligned_model"]),
                    _tensors(roles["target_model"]))
    expected = A[lowest] + align(A[lowest] - B[lowest], T[lowest] - A[lowest], "paper", 1e-6)
    torch.testing.assert_close(out[lowest], expected, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(out[n], T[n]) for n in T if n != lowest)


def test_dry_run_describes_the_plan_and_writes_nothing(roles, tmp_path):
    method = build("lox", {})
    run = run_restore(method, _pick(roles, method), tmp_path / "out", dry_run=True)
    assert run.dry_run and run.output is None and run.provenance == {} and not (tmp_path / "out").exists()
    assert run.plan.n_tensors == 28 + 2  # all_2d: the linear weights, embed_tokens and lm_head (untied)
    text = run.describe()
    assert "method: lox" in text and "tensors streamed: 30" in text and "expected peak memory" in text
    assert set(run.plan.bytes_read) == {"base_model", "aligned_model"}


def test_a_shape_mismatch_names_the_tensor_and_the_roles(roles, tmp_path):
    from transformers import AutoModelForCausalLM

    config = make_config("llama")
    config.intermediate_size = 96
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "narrow")
    method = build("resta", {})
    with pytest.raises(ModelMismatchError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight: .*aligned_model "
                                                 r"has .*target_model has \((96, 64|64, 96)\)"):
        run_restore(method, _pick(roles, method, target_model=tmp_path / "narrow"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_roles_that_do_not_fit_the_method_are_refused(roles, tmp_path):
    method = build("lssf", {})
    with pytest.raises(ConfigError, match=r"'lssf' reads .*unsafe_model is missing\. Pass it \(--unsafe-model"):
        run_restore(method, {r: roles[r] for r in ("aligned_model", "target_model")}, tmp_path / "out")
    with pytest.raises(ConfigError, match="does not read base_model"):
        run_restore(method, roles, tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown model role"):
        run_restore(method, {**_pick(roles, method), "teacher_model": roles["base_model"]}, tmp_path / "out")
    with pytest.raises(ModelError, match=r"unsafe_model \(.*nowhere\)"):
        run_restore(method, _pick(roles, method, unsafe_model=tmp_path / "nowhere"), tmp_path / "out")
    (tmp_path / "taken").mkdir()
    resta = build("resta", {})
    with pytest.raises(OutputExistsError):
        run_restore(resta, _pick(roles, resta), tmp_path / "taken")


@pytest.fixture(scope="module")
def adapter(roles, tmp_path_factory) -> Path:
    """A LoRA adapter on the aligned model over q_proj, up_proj and down_proj, saved as a patch folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(roles["aligned_model"]).eval()
    folder = tmp_path_factory.mktemp("adapter") / "lora"
    patch = random_patch(model, modules=("q_proj", "up_proj", "down_proj"), r=2, scale=0.3)
    save_patch(patch, folder, PatchManifest(method="test"), model=model)
    return folder


def test_safe_lora_projects_the_b_factors_of_an_adapter_target(roles, adapter, tmp_path):
    method = build("safe_lora", {"select_layers_type": "threshold", "threshold": 2.0})
    run = run_restore(method, _pick(roles, method, target_model=adapter), tmp_path / "out")
    assert run.kind == "adapter"
    source, repaired = load_patch(adapter), load_patch(tmp_path / "out")
    base, aligned = _tensors(roles["base_model"]), _tensors(roles["aligned_model"])
    assert repaired.config["r"] == source.config["r"] and repaired.scaling == source.scaling
    for module, factors in source.factors.items():
        new = repaired.factors[module]
        assert torch.equal(new.A, factors.A), module
        if module in SAFETY_MODULES:
            V = aligned[f"{module}.weight"] - base[f"{module}.weight"]
            torch.testing.assert_close(new.B, align(V, factors.B, "paper", 1e-6), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(new.B, factors.B), f"{module} has V = 0 and must stay as it was"
    assert repaired.manifest["method"] == "restore:safe_lora"
    assert json.loads((tmp_path / "out" / PROVENANCE_FILE).read_text())["roles"]["target_model"]["kind"] == \
        "peft_adapter"
    assert (tmp_path / "out" / REPORT_FILE).is_file()


def test_an_adapter_target_is_refused_by_a_method_that_repairs_checkpoints(roles, adapter, tmp_path):
    method = build("resta", {})
    with pytest.raises(ConfigError, match="is a PEFT adapter, but 'resta' repairs full checkpoints"):
        run_restore(method, _pick(roles, method, target_model=adapter), tmp_path / "out")
    safe_lora = build("safe_lora", {})
    with pytest.raises(ConfigError, match="drop scope"):
        run_restore(safe_lora, _pick(roles, safe_lora, target_model=adapter), tmp_path / "out", scope="linear")
