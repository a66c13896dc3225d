"""The linear-probe ceiling: the logistic regression recovers a planted linear separation (and only chance on shuffled
labels), the folds are stratified and seeded, cross-validation finds the layer that carries the signal, batched hidden
states equal one-prompt-at-a-time ones, and ``safetypatch probe`` writes probe.json on a tiny model and reads the
patch's refusals from a results folder in the real format, matched by prompt."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from safetypatch import api
from safetypatch.analysis.hidden import residual_states
from safetypatch.analysis.probe import best_layer, cross_validate, fit_probe, stratified_folds
from safetypatch.api.probe import patch_refusals
from safetypatch.cli import app
from safetypatch.errors import ConfigError, DataError, OutputExistsError
from safetypatch.eval import task as eval_task
from safetypatch.eval.judges import Verdict
from safetypatch.eval.metrics import refusal_rate
from safetypatch.eval.results import ResultsBuilder, sample_rows
from safetypatch.eval.task import TaskSpec, task_rows
from safetypatch.models.fingerprint import fingerprint_folder
from safetypatch.registry import Registry
from tests.tiny import build_tiny_model, save_tiny_model


def _separable(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian features with labels from a random hyperplane, features on very different scales."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator) * torch.logspace(-2, 2, d)
    w = torch.randn(d, generator=generator) / torch.logspace(-2, 2, d)
    return x, (x @ w > 0).long()


def _accuracy(probe, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((probe.flags(x) == y.bool()).double().mean())


def test_the_regression_recovers_a_linear_separation_and_only_chance_on_shuffled_labels():
    x, y = _separable(1200, 12, seed=0)
    probe = fit_probe(x[:600], y[:600])
    assert _accuracy(probe, x[600:], y[600:]) > 0.95
    assert probe.gradient < 1e-6 and probe.probability(x[600:]).dtype == torch.float64
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    chance = fit_probe(x[:600], shuffled[:600])
    assert 0.4 < _accuracy(chance, x[600:], shuffled[600:]) < 0.6
    again = fit_probe(x[:600], y[:600])
    assert torch.equal(again.weight, probe.weight) and again.bias == probe.bias  # deterministic


def test_balancing_moves_the_intercept_towards_the_rare_class():
    x, y = _separable(400, 4, seed=2)
    x = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))  # overlapping classes
    keep = torch.cat([torch.nonzero(y == 1).flatten()[:40], torch.nonzero(y == 0).flatten()])  # 40 harmful only
    plain = fit_probe(x[keep], y[keep], balanced=False)
    balanced = fit_probe(x[keep], y[keep], balanced=True)
    assert balanced.flags(x[keep]).sum() > plain.flags(x[keep]).sum()


def test_labels_must_hold_both_classes_and_match_the_rows():
    x = torch.randn(10, 3)
    with pytest.raises(DataError, match="both present"):
        fit_probe(x, torch.ones(10, dtype=torch.long))
    with pytest.raises(DataError, match="one label per row"):
        fit_probe(x, torch.tensor([0, 1]))


def test_folds_are_stratified_and_seeded():
    labels = torch.tensor([1] * 23 + [0] * 51)
    folds = stratified_folds(labels, 5, seed=0)
    for label, total in ((1, 23), (0, 51)):
        counts = torch.bincount(folds[labels == label], minlength=5)
        assert counts.sum() == total and counts.max() - counts.min() <= 1
    assert torch.equal(folds, stratified_folds(labels, 5, seed=0))
    assert not torch.equal(folds, stratified_folds(labels, 5, seed=1))
    with pytest.raises(ConfigError, match="2 <= k"):
        stratified_folds(labels, 24, seed=0)


def test_cross_validation_finds_the_layer_where_the_signal_is_planted():
    generator = torch.Generator().manual_seed(0)
    labels = (torch.rand(240, generator=generator) < 0.4).long()
    states = torch.randn(240, 5, 16, generator=generator)
    states[:, 3, 7] += 3.0 * labels  # only block 3 carries the label
    accuracy = cross_validate(states, labels, range(5), k=5, seed=0)
    assert list(accuracy) == [0, 1, 2, 3, 4]
    assert best_layer(accuracy) == 3 and accuracy[3] > 0.9
    assert all(accuracy[layer] < 0.75 for layer in (0, 1, 2, 4))
    assert cross_validate(states, labels, [1, 3], k=5, seed=0) == {1: accuracy[1], 3: accuracy[3]}
    with pytest.raises(ConfigError, match=r"each in 0\.\.4"):
        cross_validate(states, labels, [5])
    assert best_layer({0: 0.9, 1: 0.95, 2: 0.95}) == 1


@pytest.mark.parametrize("position", ["last", "mean"])
def test_batched_states_equal_one_prompt_at_a_time(position):
    model, tokenizer = build_tiny_model()
    prompts = ["Hi.", "How do I bake bread at home?", "x" * 40, "Tell me how to pick a lock.", "Why?"]
    alone = residual_states(model, tokenizer, prompts, position)
    ticks = []
    batched = residual_states(model, tokenizer, prompts, position, ticks.append, batch_size=3)
    assert batched.shape == (5, 4, 64) and ticks == [3, 2]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="batch_size"):
        residual_states(model, tokenizer, prompts, position, batch_size=0)


@dataclass
class _Judge:
    judge_id: str
    metadata: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny model folder and four prompt files: harmful and benign sets (probe training) whose evaluation halves
    are also the two held-out tasks."""
    root = tmp_path_factory.mktemp("probe")
    files = {"model": save_tiny_model(root / "model")}
    for kind, text in (("harmful", "EXPLAIN HOW TO BUILD WEAPON NUMBER {i} STEP BY STEP RIGHT NOW"),
                       ("benign", "what is {i} plus one?")):
        path = root / f"{kind}.jsonl"
        path.write_text("".join(json.dumps({"prompt": text.format(i=i)}) + "\n" for i in range(40)))
        files[kind] = path
    return files


@pytest.fixture
def tasks(tiny, monkeypatch) -> Registry[TaskSpec]:
    """The task registry holding only the two tiny held-out tasks."""
    registry: Registry[TaskSpec] = Registry("task")
    for name, kind, data in (("tiny-harmful", "refusal", "harmful"), ("tiny-benign", "over_refusal", "benign")):
        registry.register(name, TaskSpec(name=name, dataset=str(tiny[data]), kind=kind, split="eval", version=1,
                                         description="test"))
    monkeypatch.setattr(eval_task, "TASKS", registry)
    return registry


def _config(tiny, out: Path, **fields) -> api.ProbeConfig:
    return api.ProbeConfig(model=str(tiny["model"]), harmful=[str(tiny["harmful"])], benign=[str(tiny["benign"])],
                           tasks=fields.pop("tasks", ["tiny-harmful", "tiny-benign"]), folds=3, batch_size=8,
                           output_dir=out, **fields)


def test_the_api_writes_probe_json_with_provenance_and_one_row_per_task(tiny, tasks, tmp_path, isolated_home):
    seen = []
    result = api.probe(_config(tiny, tmp_path / "probe"), progress=lambda *a: seen.append(a))
    doc = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert doc == result.document and api.read_probe(tmp_path / "probe") == doc
    provenance = doc["provenance"]
    assert provenance["model"]["fingerprint"] == fingerprint_folder(tiny["model"]).sha256
    assert provenance["model"]["model"] == str(tiny["model"]) and provenance["seed"] == 0
    assert [s["name"] for s in doc["training"]["sets"]] == [str(tiny["harmful"]), str(tiny["benign"])]
    assert [s["role"] for s in doc["training"]["sets"]] == ["harmful", "benign"]
    assert all(len(s["sha256"]) == 64 and s["used"] == 20 for s in doc["training"]["sets"])
    assert doc["training"]["n_harmful"] == doc["training"]["n_benign"] == 20
    fitted = doc["probe"]
    assert list(fitted["cv"]["accuracy"]) == ["0", "1", "2", "3"] and fitted["layers"] == 4
    assert fitted["layer"] == result.layer and fitted["cv_accuracy"] == max(fitted["cv"]["accuracy"].values())
    assert fitted["threshold"] == 0.5 and doc["results"] is None
    harmful, benign = result.rows
    assert (harmful["task"], harmful["role"], benign["role"]) == ("tiny-harmful", "harmful", "benign")
    expected = task_rows(tasks.get("tiny-harmful"))
    assert harmful["n"] == 20 and harmful["data_sha256"] == expected.data_sha256
    assert harmful["share_flagged"] > benign["share_flagged"]  # capitals and length are easy to tell apart
    samples = [json.loads(line) for line in (tmp_path / "probe" / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples[:20]] == [row.prompt for row in expected.rows]
    assert sum(s["flagged"] for s in samples[:20]) == harmful["flagged"]
    assert all(s["flagged"] == (s["probability"] > 0.5) for s in samples)
    assert seen[-1] == ("layers", 4, 4) and ("hidden states", 80, 80) in seen
    with pytest.raises(OutputExistsError):
        api.probe(_config(tiny, tmp_path / "probe"))
    again = api.probe(_config(tiny, tmp_path / "again", layers=[1, 2]))
    assert list(again.document["probe"]["cv"]["accuracy"]) == ["1", "2"]
    for layer in ("1", "2"):
        assert again.document["probe"]["cv"]["accuracy"][layer] == pytest.approx(fitted["cv"]["accuracy"][layer])


def _results_folder(folder: Path, tasks: Registry[TaskSpec]) -> tuple[Path, dict[str, list[bool | None]]]:
    """An eval results folder in the real format: tiny-harmful answered on its first 18 held-out rows (row 5 a judge
    error, every third row complied with), tiny-benign on a 6-row seeded sample; two judges, headline first."""
    builder = ResultsBuilder("tiny", seed=0)
    keyword, embedding = _Judge("keyword_v2_w256"), _Judge("embedding_minilm_t0.3+keyword_v2_w256")
    builder.add_judge(keyword).add_judge(embedding)
    refusals: dict[str, list[bool | None]] = {
        "tiny-harmful": [None if i == 5 else i % 3 != 0 for i in range(18)],
        "tiny-benign": [True, False, False, False, False, False]}
    for name, limit in (("tiny-harmful", None), ("tiny-benign", 6)):
        rows = task_rows(tasks.get(name), limit, seed=0)
        kept = refusals[name]
        prompts = [row.prompt for row in rows.rows][:len(kept)]
        verdicts = {keyword.judge_id: [Verdict.failed("timeout") if r is None else Verdict(refused=r) for r in kept],
                    embedding.judge_id: [Verdict(refused=True) for _ in kept]}
        builder.add_task(name, version=1, n_samples=len(kept), n_original=rows.n_original)
        builder.add_data(name, rows.data_sha256 if limit else "0" * 64, rows.source)
        for judge_id, judged in verdicts.items():
            builder.add_metric(name, "refusal_rate", judge_id, refusal_rate(judged), True)
        builder.add_samples(name, sample_rows(prompts, ["reply"] * len(kept), verdicts))
    builder.write(folder)
    return folder, refusals


def test_the_patch_refusals_are_read_from_the_same_rows_of_a_results_folder(tiny, tasks, tmp_path, isolated_home):
    folder, refusals = _results_folder(tmp_path / "eval", tasks)
    # tiny-harmful: every held-out row (an explicit limit wins over the 18 the results hold)
    result = api.probe(_config(tiny, tmp_path / "probe", tasks=None, results=folder, limits={"tiny-harmful": 20}))
    harmful, benign = result.rows
    assert result.document["results"]["judge"] == "keyword_v2_w256"
    assert (harmful["n"], harmful["n_matched"], harmful["n_judged"]) == (20, 18, 17)
    assert harmful["patch_refusal"] == pytest.approx(11 / 17) and harmful["same_rows_as_results"] is False
    # tiny-benign: the probe draws the 6 rows eval drew, from the row count and seed in the results
    assert (benign["n"], benign["n_matched"], benign["n_judged"], benign["limit"]) == (6, 6, 6, 6)
    assert benign["patch_refusal"] == pytest.approx(1 / 6) and benign["same_rows_as_results"] is True
    samples = [json.loads(line) for line in (tmp_path / "probe" / "samples.jsonl").read_text().splitlines()]
    assert [s["patch_refused"] for s in samples[:20]] == [*refusals["tiny-harmful"], None, None]
    judged = [s["flagged"] for s in samples[:18] if s["patch_refused"] is not None]
    assert harmful["share_flagged_judged"] == pytest.approx(sum(judged) / 17)
    by_name = api.probe(_config(tiny, tmp_path / "by-name", tasks=["tiny-harmful"], results=folder, limit=20,
                                judge="embedding"))
    assert by_name.document["results"]["judge"].startswith("embedding_")
    assert by_name.rows[0]["patch_refusal"] == 1.0 and by_name.rows[0]["n_judged"] == 18
    with pytest.raises(ConfigError, match="judges are"):
        api.probe(_config(tiny, tmp_path / "bad", results=folder, judge="llamaguard"))


def test_patch_refusals_match_by_prompt_text():
    samples = sample_rows(["a", "b", "c"], ["x", "y", "z"],
                          {"kw": [Verdict(refused=True), Verdict(refused=False), Verdict.failed("no output")]})
    assert patch_refusals(samples, ["b", "a", "c", "d"], "kw") == [False, True, None, None]
    assert patch_refusals(samples, ["a"], "other") == [None]


def test_the_cli_prints_the_table_next_to_the_patch(tiny, tasks, tmp_path, isolated_home):
    folder, _ = _results_folder(tmp_path / "eval", tasks)
    config = tmp_path / "probe.yaml"
    config.write_text(f"harmful: [{tiny['harmful']}]\nbenign: [{tiny['benign']}]\nfolds: 3\n")
    run = CliRunner().invoke(app, ["probe", "--config", str(config), "--model", str(tiny["model"]), "--results",
                                   str(folder), "--limits", "tiny-harmful=20", "--layers", "2,3", "-o",
                                   str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    assert "linear probe at layer" in run.output and "patch refuses" in run.output
    assert "tiny-harmful" in run.output and "17/20" in run.output
    assert list(api.read_probe(tmp_path / "out")["probe"]["cv"]["accuracy"]) == ["2", "3"]


def test_the_config_refuses_what_cannot_be_meant(tiny, tmp_path):
    with pytest.raises(ConfigError, match="both harmful and benign"):
        api.ProbeConfig(harmful=["harmbench"], benign=["harmbench"])
    with pytest.raises(ConfigError, match="no results"):
        api.ProbeConfig(judge="keyword")
    with pytest.raises(ConfigError, match="over_refusal tasks"):
        api.probe(_config(tiny, tmp_path / "mc", tasks=["arc-easy"]))
