"""``safetypatch train`` under ``accelerate launch``: two CPU processes (gloo, the shipped ``cpu_2proc`` preset) train
the patch one process trains with the same global batch, and only the main process writes it, verified
(docs/methods.md §5.4). In one process: the presets, the precision rule, the gathered-adapter checks of sharded runs
and the loss through a distributed wrapper."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from peft import PeftModel
from safetensors.torch import load_file, save_file
from trl.trainer.utils import add_fused_lm_head
from typer.testing import CliRunner

from safetypatch.api.train import TrainConfig, _save
from safetypatch.cli import app
from safetypatch.errors import ConfigError, ModelError, PatchError
from safetypatch.models.loading import load_model
from safetypatch.patch.artifact import PatchManifest, load_patch
from safetypatch.patch.factors import patch_from_peft
from safetypatch.patch.probe import probe_input_ids, probe_logits
from safetypatch.train.distributed import (
    PRESETS,
    Launch,
    accelerate_preset,
    check_launcher_environment,
    export_if_sharded,
    gathered_patch,
    resolve_precision,
)
from safetypatch.train.examples import build_refusal_examples, tokenize_examples
from safetypatch.train.loss import completion_loss
from safetypatch.train.recipes import get_recipe
from safetypatch.train.refusal_sft import TrainResult, make_trainer, train_refusal_patch
from safetypatch.utils import environment
from tests.tiny import build_tiny_model

SRC = Path(__file__).resolve().parents[2] / "src"
# 12 refusals and 20 retain answers (two generation batches of 16, one per process), 4 steps of global batch 4, in
# fp32: bf16 autocast (auto's choice on a CPU with native bf16) rounds differently when the batch shape changes.
TRAIN_ARGS = ["train", "--harmful", "harmbench", "--n-harmful", "12", "--retain", "everyday-requests",
              "--retain-max-new-tokens", "8"]
RECIPE = "retain_count=20,max_steps=4,lora_dropout=0,learning_rate=1e-3,precision=fp32"
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(command: list[str]) -> float:
    """Run a CLI command in a fresh process (one thread per process: two processes share two cores); its seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_") and k not in LAUNCHER_ENV}
    env.update(PYTHONPATH=os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return time.perf_counter() - start


def test_two_processes_train_the_patch_one_process_trains(tiny_model_dirs, tmp_path):
    model = str(tiny_model_dirs["llama"])
    cli = ["-m", "safetypatch.cli", *TRAIN_ARGS, "--model", model]
    _run([sys.executable, *cli, "--set", f"{RECIPE},per_device_train_batch_size=4", "-o", str(tmp_path / "one")])
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_preset(
        "cpu_2proc").path), "--main_process_port", str(_free_port())]
    seconds = _run([*launch, *cli, "--set", f"{RECIPE},per_device_train_batch_size=2", "-o", str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / run / "safety_patch.json").read_text()) for run in ("one", "two"))
    assert two["training"]["launch"] == {"distributed_type": "MULTI_CPU", "num_processes": 2, "precision": "fp32"}
    assert one["training"]["launch"]["num_processes"] == 1
    assert two["extra"]["examples_sha256"] == one["extra"]["examples_sha256"]  # identical data, retain answers too
    curves = [torch.tensor(run["training"]["loss_history"]) for run in (one, two)]
    assert curves[0].shape == curves[1].shape == (4, 2) and torch.equal(curves[0][:, 0], curves[1][:, 0])
    difference = float((curves[0][:, 1] - curves[1][:, 1]).abs().max())
    print(f"2-process run {seconds:.1f} s; loss curves differ by at most {difference:.2e}")
    assert difference < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one writer, no stray temporary folders
    patches = {run: load_patch(tmp_path / run) for run in ("one", "two")}
    assert patches["two"].modules == patches["one"].modules and len(patches["two"].modules) == 28
    assert all(float(f.B.norm()) > 0 for f in patches["two"].factors.values())
    base, _ = build_tiny_model("llama")
    ids = probe_input_ids(base)
    reloaded = {run: probe_logits(PeftModel.from_pretrained(build_tiny_model("llama")[0], str(tmp_path / run)), ids)
                for run in ("one", "two")}
    torch.testing.assert_close(reloaded["two"], reloaded["one"], rtol=0, atol=1e-4)
    assert float((reloaded["two"] - probe_logits(base, ids)).abs().max()) > 1e-3  # the patch does something


def test_zero3_on_two_cpu_processes_saves_the_whole_adapter(tiny_model_dirs, tmp_path):
    """Where DeepSpeed is installed (its CPU accelerator runs over gloo): the ZeRO-3 preset, whose parameters are
    shards, trains the same curve and its gathered adapter passes the §5.4 checks (huggingface/peft #2892)."""
    pytest.importorskip("deepspeed")
    config = tmp_path / "zero3.yaml"
    config.write_text(accelerate_preset("zero3").path.read_text().replace("num_processes: 8", "num_processes: 2"))
    cli = ["-m", "safetypatch.cli", *TRAIN_ARGS, "--model", str(tiny_model_dirs["llama"])]
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
          str(_free_port()), *cli, "--set", f"{RECIPE},per_device_train_batch_size=2", "-o", str(tmp_path / "z3")])
    _run([sys.executable, *cli, "--set", f"{RECIPE},per_device_train_batch_size=4", "-o", str(tmp_path / "one")])
    one, z3 = (json.loads((tmp_path / run / "safety_patch.json").read_text()) for run in ("one", "z3"))
    assert z3["training"]["launch"]["distributed_type"] == "DEEPSPEED"
    curves = [torch.tensor(run["training"]["loss_history"])[:, 1] for run in (one, z3)]
    assert float((curves[0] - curves[1]).abs().max()) < 1e-4
    assert load_patch(tmp_path / "z3").modules == load_patch(tmp_path / "one").modules


def test_presets_are_accelerate_configs_with_the_settings_that_keep_adapters_whole():
    assert PRESETS.names() == ["cpu_2proc", "fsdp", "multi_gpu", "single_gpu", "zero2", "zero3"]
    configs = {name: load_config_from_file(str(accelerate_preset(name).path)) for name in PRESETS}
    assert {name: str(c.distributed_type.value) for name, c in configs.items()} == {
        "cpu_2proc": "MULTI_GPU", "fsdp": "FSDP", "multi_gpu": "MULTI_GPU", "single_gpu": "NO",
        "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
    assert configs["cpu_2proc"].use_cpu and configs["cpu_2proc"].num_processes == 2
    assert configs["zero3"].deepspeed_config["zero3_save_16bit_model"] is True
    assert [configs[z].deepspeed_config["zero_stage"] for z in ("zero2", "zero3")] == [2, 3]
    assert configs["fsdp"].fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert configs["fsdp"].fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
    assert all(c.mixed_precision == "no" for c in configs.values())  # the recipe's precision decides
    assert all(accelerate_preset(n).description for n in PRESETS)
    with pytest.raises(ConfigError, match="Did you mean 'zero3'"):
        accelerate_preset("zero4")


def test_ls_accelerate_lists_the_presets_and_prints_one_path_for_config_file():
    listing = CliRunner().invoke(app, ["ls", "accelerate"])
    assert listing.exit_code == 0 and all(name in listing.output for name in PRESETS)
    path = CliRunner().invoke(app, ["ls", "accelerate", "zero3"])
    assert path.exit_code == 0 and path.output == f"{accelerate_preset('zero3').path}\n"
    unknown = CliRunner().invoke(app, ["ls", "accelerate", "zero4"])
    assert unknown.exit_code == 2 and "Did you mean 'zero3'" in unknown.output


@pytest.mark.parametrize(("requested", "launcher", "device", "expected"), [
    ("auto", None, "cpu", "fp32"), ("auto", None, "cpu-bf16", "bf16"), ("auto", "no", "gpu-bf16", "bf16"),
    ("auto", None, "gpu-fp16", "fp16"), ("auto", "bf16", "cpu", "bf16"), ("fp16", "fp16", "gpu-bf16", "fp16"),
    ("fp32", "no", "gpu-bf16", "fp32"), ("fp32", None, "cpu-bf16", "fp32"),
])
def test_precision_follows_the_recipe_or_the_launcher(monkeypatch, requested, launcher, device, expected):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    if launcher is not None:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device.startswith("gpu"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: device == "gpu-bf16")
    monkeypatch.setattr(environment, "cpu_has_bf16", lambda: device == "cpu-bf16")
    assert resolve_precision(requested) == expected


def test_precision_conflicts_and_unusable_launcher_settings_are_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with pytest.raises(ConfigError, match="precision='fp32' but accelerate launch sets mixed_precision='bf16'"):
        resolve_precision("fp32")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="fp8"):
        resolve_precision("auto")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ConfigError, match="fsdp_cpu_ram_efficient_loading"):
        check_launcher_environment()


def _refusals(tok):
    from safetypatch.data import Example

    rows = [Example(prompt=f"request {i} " * (1 + i % 3), category="illegal") for i in range(8)]
    return tokenize_examples(tok, build_refusal_examples(rows), max_length=128)


def _trained(tmp_path, mode="lora"):
    """A short single-process run whose result, and Trainer.save_model folder, stand in for a sharded run's."""
    model, tok = build_tiny_model("llama")
    recipe = get_recipe("mou", mode=mode, max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4)
    trainer = make_trainer(model, tok, _refusals(tok), recipe, tmp_path / "work")
    trainer.train()
    trainer.save_model(str(tmp_path / "trained"))  # what Trainer writes after gathering FSDP / ZeRO weights
    return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval(), tok, recipe


def test_export_gathers_through_trainer_only_for_sharded_runs_and_only_the_main_process_keeps_it(tmp_path):
    saved = []

    def stub(fsdp, deepspeed, main):
        return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=deepspeed, save_model=saved.append,
                               accelerator=SimpleNamespace(is_main_process=main))

    assert export_if_sharded(stub(False, False, True), tmp_path) is None and saved == []
    assert export_if_sharded(stub(True, False, True), tmp_path / "t") == tmp_path / "t"
    assert export_if_sharded(stub(True, False, False), tmp_path / "t") is None  # took part in the gather only
    assert saved == [str(tmp_path / "t")] * 2


def test_a_gathered_adapter_is_saved_verified_on_a_fresh_base(tmp_path, tiny_model_dirs):
    trained, _, recipe = _trained(tmp_path)
    expected = patch_from_peft(trained)
    cfg = TrainConfig(model=str(tiny_model_dirs["llama"]), output=tmp_path / "patch")
    loaded = load_model(cfg.model)
    result = SimpleNamespace(exported=tmp_path / "trained", model=trained)
    _save(cfg, loaded, recipe, result, PatchManifest(method="refusal_sft"))
    saved = load_patch(tmp_path / "patch")
    assert saved.modules == expected.modules
    for module in saved.modules:
        torch.testing.assert_close(saved.delta(module), expected.delta(module), rtol=0, atol=1e-7)


def test_empty_partial_and_shard_shaped_gathered_adapters_are_refused(tmp_path):
    trained, _, _ = _trained(tmp_path)
    folder = tmp_path / "trained"
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    save_file({}, str(weights))  # what ZeRO-3 wrote without zero3_save_16bit_model (huggingface/peft #2892)
    with pytest.raises(PatchError, match="zero3_save_16bit_model: true"):
        gathered_patch(folder, trained)
    save_file({k: v for k, v in tensors.items() if ".layers.3." not in k}, str(weights))
    with pytest.raises(PatchError, match=r"lacks 7 of the trained modules \(first: model.layers.3.mlp.down_proj\)"):
        gathered_patch(folder, trained)
    save_file({k: v[: v.shape[0] // 2] if "lora_A" in k else v for k, v in tensors.items()}, str(weights))
    with pytest.raises(PatchError, match="saved from a sharded model"):  # one rank's shard (accelerate PR #4206)
        gathered_patch(folder, trained)


def test_a_full_model_gathered_from_a_sharded_run_is_reloaded_and_saved(tmp_path, tiny_model_dirs):
    trained, _, recipe = _trained(tmp_path, mode="full")
    cfg = TrainConfig(model=str(tiny_model_dirs["llama"]), output=tmp_path / "full", full=True)
    _save(cfg, load_model(cfg.model), recipe, SimpleNamespace(exported=tmp_path / "trained", model=trained),
          PatchManifest(method="refusal_sft"))
    ids = probe_input_ids(trained)
    torch.testing.assert_close(probe_logits(load_model(str(tmp_path / "full")).model, ids), probe_logits(trained, ids))
    (tmp_path / "trained" / "model.safetensors").unlink()  # ZeRO-3 without zero3_save_16bit_model, in full mode
    with pytest.raises(ModelError, match="zero3_save_16bit_model: true"):
        _save(cfg.model_copy(update={"output": tmp_path / "full2"}), load_model(cfg.model), recipe,
              SimpleNamespace(exported=tmp_path / "trained", model=trained), PatchManifest(method="refusal_sft"))


@pytest.mark.parametrize("unlikelihood", [0.0, 10.0])
def test_the_loss_through_a_distributed_wrapper_equals_the_direct_supervised_loss(unlikelihood):
    """Under DDP / FSDP / DeepSpeed the loss reads TRL's fused LM head through the wrapper's forward (the full logits
    when the retain unlikelihood term is on)."""
    model, tok = build_tiny_model("gemma3")  # tied embeddings; soft-capping below
    model.config.final_logit_softcapping = 3.0
    add_fused_lm_head(model)
    data = _refusals(tok)[:3]
    width = max(len(ex.input_ids) for ex in data)
    ids = torch.tensor([list(ex.input_ids) + [256] * (width - len(ex.input_ids)) for ex in data])
    labels = torch.tensor([ex.labels + [-100] * (width - len(ex.input_ids)) for ex in data])
    inputs = {"input_ids": ids, "attention_mask": (torch.arange(width) < torch.tensor(
        [[len(ex.input_ids)] for ex in data])).long()}
    weights = torch.tensor([1.0, 0.5, 2.0])
    results = []
    for wrapped in (False, True):
        model.zero_grad()
        loss, count = completion_loss(model, dict(inputs), labels, weights, 40, wrapped=wrapped,
                                      unlikely=torch.tensor([False, True, True]), openings=(5, 9),
                                      unlikelihood_weight=unlikelihood)
        loss.backward()
        results.append((loss.detach(), count, model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[1][1] == results[0][1]
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-4, atol=1e-7)
    plain = completion_loss(model, dict(inputs), labels, weights, 40)[0].detach()
    assert (float(results[0][0]) > float(plain) + 1e-4) == (unlikelihood > 0)  # the term is in both paths


def test_batches_are_grouped_over_the_global_batch_with_a_seeded_order(tmp_path):
    """One process with batch 4, or batch 2 and accumulation 2, sees the same batches (so does 2 × 2, above)."""
    model, tok = build_tiny_model("llama")
    orders = []
    for batch, accumulation in ((4, 1), (2, 2), (4, 1)):
        recipe = get_recipe("mou", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
        trainer = make_trainer(build_tiny_model("llama")[0], tok, _refusals(tok) * 4, recipe, tmp_path / "w")
        orders.append(list(trainer._get_train_sampler()))
    assert orders[0] == orders[1] == orders[2] and sorted(orders[0]) == list(range(32))
    del model


def test_the_training_block_records_the_launch_without_copying_the_model(tmp_path):
    class Uncopyable:
        def __deepcopy__(self, memo):
            raise AssertionError("the model was deep-copied")

    block = TrainResult(model=Uncopyable(), loss_history=((1, 2.0),), steps=1, seconds=1.0, tokens_per_second=3.0,
                        supervised_fraction=0.5, launch=Launch("MULTI_GPU", 4, "bf16", is_main_process=False),
                        exported=tmp_path).to_dict()
    assert block["launch"] == {"distributed_type": "MULTI_GPU", "num_processes": 4, "precision": "bf16"}
    assert "model" not in block and "exported" not in block and block["loss_history"] == [[1, 2.0]]
    model, tok = build_tiny_model("llama")
    result = train_refusal_patch(model, tok, _refusals(tok), get_recipe("mou", max_steps=1), tmp_path / "run")
    assert result.launch == Launch("NO", 1, resolve_precision("auto")) and result.exported is None
