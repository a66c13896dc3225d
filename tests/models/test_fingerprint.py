from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from safetypatch.models.fingerprint import fingerprint_folder
from tests.tiny import build_tiny_model


def test_fingerprint_is_stable_and_counts_parameters(tiny_model_dirs):
    first = fingerprint_folder(tiny_model_dirs["llama"])
    again = fingerprint_folder(tiny_model_dirs["llama"])
    assert first == again
    model, _ = build_tiny_model("llama")
    assert first.n_params == sum(p.numel() for p in model.parameters())
    assert first.arch["num_hidden_layers"] == 4


def test_weights_change_fingerprint_but_not_shape_digest(tmp_path, tiny_model_dirs):
    model, _ = build_tiny_model("llama")
    weight = model.model.layers[2].mlp.up_proj.weight
    with torch.no_grad():
        weight.add_(1e-3 * torch.randn_like(weight))
    model.save_pretrained(tmp_path / "ft")
    base = fingerprint_folder(tiny_model_dirs["llama"])
    tuned = fingerprint_folder(tmp_path / "ft")
    assert tuned.sha256 != base.sha256
    assert tuned.shape_sha256 == base.shape_sha256


def test_architectures_differ(tiny_model_dirs):
    digests = {fingerprint_folder(path).shape_sha256 for path in tiny_model_dirs.values()}
    assert len(digests) == 3


def test_sharded_and_single_file_agree(tmp_path, tiny_model_dirs):
    model, _ = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert fingerprint_folder(tmp_path / "sharded").sha256 == fingerprint_folder(tiny_model_dirs["llama"]).sha256


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise, /proc/self/fd")
def test_the_sampled_rows_are_advised_before_they_are_read_and_the_digest_is_unchanged(tmp_path, monkeypatch):
    model, _ = build_tiny_model("llama")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    folder = tmp_path / "sharded"
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    without = fingerprint_folder(folder)
    advised: list[tuple[str, int, int]] = []

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, offset + length))

    monkeypatch.setattr(os, "posix_fadvise", record, raising=False)
    assert fingerprint_folder(folder) == without
    expected = set()
    for path in folder.glob("*.safetensors"):
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        for name, entry in json.loads(raw[8:8 + length]).items():
            if name == "__metadata__":
                continue
            start, stop = (8 + length + x for x in entry["data_offsets"])
            n = entry["shape"][0]
            row = (stop - start) // n
            expected |= {(path.name, start + r * row, start + (r + 1) * row) for r in (0, n // 3, 2 * n // 3, n - 1)}
    assert sorted(advised) == sorted(expected)  # each sampled row once, nothing else


def test_a_truncated_or_malformed_checkpoint_is_named(tiny_model_dirs, tmp_path):
    from safetypatch.errors import ModelError

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors is not a valid safetensors file: .*truncated"):
        fingerprint_folder(folder)
    weights.write_bytes(data)
    (folder / "config.json").write_text("[]")
    with pytest.raises(ModelError, match=r"config\.json holds a JSON list, but the model config must be"):
        fingerprint_folder(folder)
