"""Training checkpoints and resume (issue 28): a run stopped after a checkpoint and resumed from it ends with the loss
history and the adapter of an uninterrupted run; the checkpoint folder refuses what would mix two runs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from safetypatch.data import Example
from safetypatch.errors import ConfigError, OutputExistsError
from safetypatch.patch.factors import patch_from_peft
from safetypatch.train.checkpoints import TrainCheckpoints, checkpoint_folder, last_checkpoint
from safetypatch.train.examples import build_refusal_examples, build_retain_examples, tokenize_examples
from safetypatch.train.recipes import get_recipe
from safetypatch.train.refusal_sft import train_refusal_patch
from safetypatch.utils.io import MARKER
from tests.tiny import build_tiny_model

PROMPTS = ["how to hack wifi", "make a bomb", "write a scam email to my grandmother", "steal a car"]


class Stopped(Exception):
    pass


class StopAt(TrainerCallback):
    """Raise at the end of optimiser step ``step``, before its checkpoint would be saved, as a killed run stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Stopped


def _train(tmp_path, name, checkpoints=None, callbacks=None):
    """Six steps of batch 2 on six examples (two epochs, reshuffled), with LoRA dropout: data order and RNG matter."""
    model, tok = build_tiny_model("llama")
    rows = [Example(prompt=p, category="harmful") for p in PROMPTS]
    data = tokenize_examples(tok, build_refusal_examples(rows) + build_retain_examples(
        ["what is tea", "name a colour"], ["Tea is a drink.", "Blue."]), max_length=256)
    recipe = get_recipe("mou", max_steps=6, per_device_train_batch_size=2, learning_rate=1e-2, lora_dropout=0.1)
    return train_refusal_patch(model, tok, data, recipe, tmp_path / name, callbacks=callbacks,
                               checkpoints=checkpoints)


def test_a_run_resumed_from_its_checkpoint_ends_as_an_uninterrupted_run(tmp_path):
    whole = _train(tmp_path, "whole")
    checkpoints = TrainCheckpoints(tmp_path / "patch", every=2, resume=False, overwrite=False)
    with pytest.raises(Stopped):
        _train(tmp_path, "stopped", checkpoints.trainer_settings(), [StopAt(5)])  # mid-epoch 2, after checkpoint 4
    assert last_checkpoint(checkpoints.folder) == (4, checkpoints.folder / "checkpoint-4")
    assert not (checkpoints.folder / "checkpoint-2").exists()  # only the newest is kept
    resumed = TrainCheckpoints(tmp_path / "patch", every=None, resume=True, overwrite=False)
    assert resumed.every == 2  # the interval of the checkpoint resumed from
    result = _train(tmp_path, "resumed", resumed.trainer_settings())
    assert result.resumed_from_step == 4 and whole.resumed_from_step == 0
    assert result.loss_history == whole.loss_history and len(result.loss_history) == 6
    ours, theirs = patch_from_peft(result.model), patch_from_peft(whole.model)
    assert ours.modules == theirs.modules
    for name in ours.modules:
        assert torch.equal(ours.factors[name].A, theirs.factors[name].A), name
        assert torch.equal(ours.factors[name].B, theirs.factors[name].B), name
    assert max(float(f.B.abs().max()) for f in ours.factors.values()) > 1e-4  # it trained


def test_the_checkpoint_folder_keeps_runs_apart(tmp_path):
    output = tmp_path / "patch"
    folder = checkpoint_folder(output)
    assert folder == tmp_path / "patch.checkpoints"
    first = TrainCheckpoints(output, every=2, resume=False, overwrite=False)
    calls = []
    answers = first.reuse("answers", ["model", 1], lambda: calls.append(1) or [Example(prompt="hi", category="c")],
                          Example)
    first.bind({"r": 8, "seed": 0}, "abc")
    assert (folder / MARKER).is_file() and json.loads((folder / "run.json").read_text())["examples_sha256"] == "abc"
    state = folder / "checkpoint-2" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"global_step": 2, "save_steps": 2}))
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4, "save_st')  # killed mid-write
    assert last_checkpoint(folder) == (2, folder / "checkpoint-2")

    with pytest.raises(OutputExistsError, match=r"patch\.checkpoints holds the training checkpoints .*--resume.*"
                                                r"--overwrite"):
        TrainCheckpoints(output, every=2, resume=False, overwrite=False)
    again = TrainCheckpoints(output, every=None, resume=True, overwrite=False)
    assert again.reuse("answers", ["model", 1], lambda: pytest.fail("recomputed"), Example) == answers
    assert again.reuse("answers", ["model", 2], lambda: calls.append(2) or [], Example) == [] and calls == [1, 2]
    with pytest.raises(ConfigError, match=r"recipe fields \['r'\].*--overwrite without --resume"):
        again.bind({"r": 4, "seed": 0}, "abc")
    with pytest.raises(ConfigError, match="training examples"):
        again.bind({"r": 8, "seed": 0}, "abd")
    again.bind({"r": 8, "seed": 0}, "abc")
    assert again.trainer_settings().resume_from == folder / "checkpoint-2"
    assert not (folder / "checkpoint-4").exists()  # the one killed mid-save is gone: Trainer would keep it

    TrainCheckpoints(output, every=2, resume=False, overwrite=True)  # starting over removes them
    assert not folder.exists()
    nothing = TrainCheckpoints(output, every=None, resume=True, overwrite=False)  # nothing to resume: from step 1
    assert nothing.trainer_settings() is None and not nothing.active
    nothing.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_patch_resumes_without_answering_the_retain_prompts_again(tiny_model_dirs, tmp_path, monkeypatch):
    """The API path: checkpoints beside the output, the retain answers kept with them, a resume that ends with the
    uninterrupted run's losses and adapter, and nothing left beside the patch."""
    from safetypatch import api
    from safetypatch.patch.artifact import load_patch

    def config(output, **options):
        return api.TrainConfig(
            model=str(tiny_model_dirs["llama"]), harmful=["harmbench"], n_harmful=4, retain=["everyday-requests"],
            retain_max_new_tokens=4, output=output, recipe_overrides={
                "retain_count": 4, "max_steps": 6, "per_device_train_batch_size": 2, "precision": "fp32"}, **options)

    def stop_at_5(what, done, total):
        if what == "train" and done == 5:
            raise KeyboardInterrupt

    whole = api.train_patch(config(tmp_path / "whole"))
    with pytest.raises(KeyboardInterrupt):
        api.train_patch(config(tmp_path / "patch", checkpoint_every=2), progress=stop_at_5)
    folder = tmp_path / "patch.checkpoints"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch.checkpoints", "whole"]
    assert {"checkpoint-4", "retain_answers.json", "run.json", MARKER} <= {p.name for p in folder.iterdir()}
    with pytest.raises(ConfigError, match="recipe fields"):  # other options cannot resume these checkpoints
        api.train_patch(config(tmp_path / "patch", resume=True).model_copy(update={"recipe": "xue"}))
    monkeypatch.setattr(api.train, "_retain_answers", lambda *a: pytest.fail("the retain answers were generated"))
    resumed = api.train_patch(config(tmp_path / "patch", resume=True))
    assert resumed.training["resumed_from_step"] == 4
    assert resumed.training["loss_history"] == whole.training["loss_history"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["patch", "whole"]
    ours, theirs = load_patch(tmp_path / "patch"), load_patch(tmp_path / "whole")
    assert all(torch.equal(ours.factors[m].B, theirs.factors[m].B) for m in theirs.modules)
