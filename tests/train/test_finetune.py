"""Supervised fine-tuning on the tiny llama model: response-only supervision, a lower loss on the rows trained on,
a complete model folder that loads and differs from the base only where it was trained, its provenance, and the
no-overwrite rule (API, train tier and CLI)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import safetypatch
from safetypatch import api
from safetypatch.cli import app
from safetypatch.data import Dataset, Example, canonical_split, load_dataset
from safetypatch.errors import ConfigError, DataError, OutputExistsError
from safetypatch.train.examples import tokenize_examples
from safetypatch.train.finetune import FINETUNE_FILE, finetune_examples, finetune_model, finetune_recipe
from safetypatch.train.loss import completion_loss
from safetypatch.train.recipes import ALL_LINEAR
from tests.tiny import make_tokenizer

EOT, PAD = 258, 256
FAST = {"max_steps": 4, "learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_length": 256,
        "lora_dropout": 0.0}


def _rows(n: int) -> Dataset:
    return Dataset("toy", tuple(Example(prompt=f"What is {i}+{i}?", response=f"{i}+{i} = {2 * i}\n#### {2 * i}")
                                for i in range(n)), "memory")


def _mean_loss(model, tok, dataset: Dataset) -> float:
    """Completion-only CE over every row of ``dataset``, in one padded batch."""
    data = tokenize_examples(tok, finetune_examples(dataset), max_length=256)
    width = max(len(ex.input_ids) for ex in data)
    ids = torch.tensor([list(ex.input_ids) + [PAD] * (width - len(ex.input_ids)) for ex in data])
    labels = torch.tensor([ex.labels + [-100] * (width - len(ex.input_ids)) for ex in data])
    mask = torch.tensor([[1] * len(ex.input_ids) + [0] * (width - len(ex.input_ids)) for ex in data])
    with torch.no_grad():
        loss, _ = completion_loss(model, {"input_ids": ids, "attention_mask": mask}, labels)
    return float(loss)


def test_only_the_response_and_its_end_of_turn_are_supervised():
    tok = make_tokenizer()
    row = load_dataset("arith", limit=1).rows[0]
    [ex] = tokenize_examples(tok, finetune_examples(Dataset("arith", (row,), "memory")), max_length=256)
    prompt = f"<|im_start|>user\n{row.prompt}<|im_end|>\n<|im_start|>assistant\n"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == list(ex.input_ids[n_prompt:])
    assert tok.decode(ex.labels[n_prompt:]) == row.response + "<|im_end|>"  # not the newline after it
    assert ex.labels[-1] == EOT and tok.decode(ex.input_ids[:n_prompt]) == prompt


def test_finetune_lowers_the_loss_and_writes_a_loadable_descendant(tmp_path, tiny_model_dirs):
    base_dir = tiny_model_dirs["llama"]
    cfg = api.FinetuneConfig(model=str(base_dir), dataset="arith", n=8, recipe_overrides=FAST,
                             output=tmp_path / "model")
    result = safetypatch.finetune(cfg)
    trained = canonical_split(load_dataset("arith")).train
    rows = Dataset(trained.name, trained.rows[:8], trained.source)
    base, child = safetypatch.load_model(str(base_dir)), safetypatch.load_model(str(result.path))
    assert child.resolved.kind == "local" and child.tokenizer.chat_template == base.tokenizer.chat_template
    assert _mean_loss(child.model, child.tokenizer, rows) < _mean_loss(base.model, base.tokenizer, rows) - 0.05
    before, after = base.model.state_dict(), child.model.state_dict()
    assert set(before) == set(after)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(tuple(f"{m}.weight" for m in ALL_LINEAR)) for name in changed)
    manifest = json.loads((result.path / FINETUNE_FILE).read_text())
    assert manifest["data"]["sha256"] == result.dataset_sha256 == rows.sha256
    assert (manifest["data"]["name"], manifest["data"]["rows"], result.rows) == ("arith/train", 8, 8)
    assert manifest["base_model"]["fingerprint"] == base.fingerprint.sha256 != child.fingerprint.sha256
    assert manifest["output_fingerprint"] == child.fingerprint.sha256
    assert manifest["recipe"]["mode"] == "lora" and manifest["merge"]["modules"] == 4 * len(ALL_LINEAR)
    assert [step for step, _ in manifest["training"]["loss_history"]] == [1, 2, 3, 4]
    assert manifest["seconds"] >= manifest["training"]["seconds"] > 0
    assert manifest["extra"]["finetune_config"]["n"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with pytest.raises(OutputExistsError, match="already exists"):
        safetypatch.finetune(cfg)


def test_full_mode_writes_the_trained_weights_and_never_half_a_folder(tmp_path, tiny_model_dirs):
    recipe = finetune_recipe("mou", "full", {**FAST, "max_steps": 1})
    output = tmp_path / "full"
    loaded = safetypatch.load_model(str(tiny_model_dirs["llama"]))
    manifest = finetune_model(loaded, _rows(4), recipe, output)
    assert manifest.merge is None and manifest.data["rows"] == 4 and manifest.recipe["mode"] == "full"
    reloaded = safetypatch.load_model(str(output)).model.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in loaded.model.state_dict().items())
    with pytest.raises(OutputExistsError):
        finetune_model(loaded, _rows(4), recipe, output)
    no_responses = Dataset("prompts", (Example("hi"), Example("ho")), "memory")
    with pytest.raises(DataError, match=r"'prompts': 2 of 2 rows have no response \(first: row 0"):
        finetune_model(loaded, no_responses, recipe, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_config_refuses_refusal_only_fields_a_second_mode_and_evaluated_rows(tmp_path):
    assert finetune_recipe("xue", "lora", {}).target_modules == ("up_proj",)
    mou = finetune_recipe("mou", "lora", {})
    assert (mou.retain_count, mou.lead_tokens, mou.lead_weight, mou.r) == (0, 0, 1.0, 8)
    with pytest.raises(ConfigError, match="retain_count shape refusal-SFT data only"):
        finetune_recipe("mou", "lora", {"retain_count": 10})
    with pytest.raises(ConfigError, match="sets mode='full' but the fine-tune mode is 'lora'"):
        finetune_recipe("mou", "lora", {"mode": "full"})
    with pytest.raises(ConfigError, match=r"task 'gsm8k' evaluates every row of 'gsm8k' \(split: all\)"):
        safetypatch.finetune(api.FinetuneConfig(dataset="gsm8k", output=tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def test_cli_finetune_takes_recipe_overrides_and_loads(tmp_path, tiny_model_dirs):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r.to_dict()) + "\n" for r in _rows(6).rows), encoding="utf-8")
    out = tmp_path / "model"
    args = ["finetune", "--model", str(tiny_model_dirs["llama"]), "--dataset", str(data), "--n", "2", "--mode",
            "full", "--set", "max_steps=1,per_device_train_batch_size=2,max_length=128", "-o", str(out)]
    run = CliRunner().invoke(app, args)
    assert run.exit_code == 0, run.output
    manifest = json.loads((out / FINETUNE_FILE).read_text())
    assert manifest["recipe"]["max_steps"] == 1 and manifest["data"]["rows"] == 2
    assert safetypatch.load_model(str(out)).resolved.path == out.resolve()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
