"""The per-layer restoration report: rows from every method, JSON-serialisable, written atomically."""

from __future__ import annotations

import json

import pytest

from safetypatch.errors import OutputExistsError
from safetypatch.restoration import RestoreReport
from safetypatch.restoration.report import locate
from tests.restore.helpers import CHANGING, IDENTITY, build, roles, run


def test_locate_splits_layer_and_module():
    assert locate("model.layers.3.mlp.up_proj.weight") == (3, "mlp.up_proj")
    assert locate("model.embed_tokens.weight") == (None, "model.embed_tokens")


@pytest.mark.parametrize(("name", "overrides"), CHANGING[::2] + IDENTITY[::2])
def test_every_method_report_is_json_and_summarised(name, overrides, tmp_path):
    method = build(name, overrides)
    report = RestoreReport.for_method(method, target="tiny")
    for layer in (1, 0):
        tensor = f"model.layers.{layer}.mlp.down_proj.weight"
        report.add(tensor, run(method, roles(seed=layer), tensor))
    document = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert document["method"] == name and document["config"] == method.config.model_dump(mode="json")
    assert [row["layer"] for row in document["layers"]] == [0, 1]
    assert document["summary"]["tensors"] == 2 and document["meta"] == {"target": "tiny"}
    changed = document["summary"]["changed"]
    assert changed == (0 if (name, overrides) in IDENTITY else 2)
    assert all(row["module"] == "mlp.down_proj" for row in document["layers"])
    path = report.write(tmp_path / "restore_report.json")
    assert json.loads(path.read_text()) == document
    with pytest.raises(OutputExistsError):
        report.write(path)
