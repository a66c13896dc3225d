"""The streaming weight engine (docs/methods.md §2.3, §5.2): reading single and sharded checkpoints, name selection,
role alignment, the in-place shard writer, and the run plan, on the tiny models of tests/tiny.py."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import safetypatch
from safetypatch.errors import ConfigError, ModelError, ModelMismatchError, OutputExistsError
from safetypatch.utils.io import MARKER
from safetypatch.weights import reader as reader_module
from safetypatch.weights import writer as writer_module
from safetypatch.weights.elementwise import Elementwise
from safetypatch.weights.stream import (
    LINEAR_PATTERNS,
    CheckpointReader,
    CheckpointWriter,
    aligned,
    compute_device,
    plan,
    select_names,
)
from tests.tiny import build_tiny_model, make_config

LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _save(model, folder: Path, **kwargs) -> Path:
    model.save_pretrained(folder, **kwargs)
    return folder


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    """The tiny llama (seed 0) saved in many small shards with an index."""
    model, tok = build_tiny_model("llama")
    folder = _save(model, tmp_path_factory.mktemp("sharded") / "llama", max_shard_size="60KB")
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory) -> Path:
    """A tiny llama with intermediate size 96 instead of 128."""
    config = make_config("llama")
    config.intermediate_size = 96
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return _save(model, tmp_path_factory.mktemp("narrow") / "llama")


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


# reading


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_reading_equals_the_state_dict(tiny_model_dirs, arch):
    model, _ = build_tiny_model(arch)
    expected = model.state_dict()
    with CheckpointReader(tiny_model_dirs[arch]) as reader:
        names = reader.names()
        assert names and set(names) <= set(expected)
        for name in names:
            tensor = reader.get(name)
            assert torch.equal(tensor, expected[name]), name
            assert reader.shape(name) == tuple(expected[name].shape)
            assert reader.dtype(name) == expected[name].dtype
            assert reader.nbytes(name) == expected[name].numel() * expected[name].element_size()


def test_sharded_folder_reads_like_the_single_file(tiny_model_dirs, sharded_dir):
    shards = sorted(sharded_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and (sharded_dir / "model.safetensors.index.json").is_file()
    single, sharded = CheckpointReader(tiny_model_dirs["llama"]), CheckpointReader(sharded_dir)
    assert sorted(sharded.names()) == sorted(single.names())
    files = [sharded.info(name).file for name in sharded.names()]
    assert files == sorted(files), "names come shard by shard"
    for name in single.names():
        assert torch.equal(sharded.get(name), single.get(name)), name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_no_shard_stays_mapped_between_reads(tiny_model_dirs):
    reader = CheckpointReader(tiny_model_dirs["llama"])
    tensor = reader.get("model.embed_tokens.weight")
    del tensor
    maps = Path("/proc/self/maps").read_text()
    assert str(tiny_model_dirs["llama"] / "model.safetensors") not in maps


def test_reader_errors_name_the_folder_and_the_tensor(tiny_model_dirs, sharded_dir, tmp_path):
    reader = CheckpointReader(tiny_model_dirs["llama"])
    with pytest.raises(ModelError, match=r"has no tensor 'model\.layers\.0\.mlp\.up_proj\.weigth'.*Did you mean "
                                         r"model\.layers\.0\.mlp\.up_proj\.weight"):
        reader.get("model.layers.0.mlp.up_proj.weigth")
    reader.close()
    with pytest.raises(ModelError, match="is closed"):
        reader.get("model.norm.weight")
    with pytest.raises(ModelError, match=r"holds neither model\.safetensors nor"):
        CheckpointReader(tmp_path)
    with pytest.raises(ModelError, match="is not a folder"):
        CheckpointReader(tmp_path / "absent")

    missing_shard = shutil.copytree(sharded_dir, tmp_path / "missing-shard")
    next(missing_shard.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(ModelError, match=r"lists shard model-00002-of-\d+\.safetensors, which is missing"):
        CheckpointReader(missing_shard)

    corrupt = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match=r"model\.safetensors is not a valid safetensors file: header length"):
        CheckpointReader(corrupt)

    bad_index = shutil.copytree(sharded_dir, tmp_path / "bad-index")
    index = json.loads((bad_index / "model.safetensors.index.json").read_text())
    first_shard = sorted(set(index["weight_map"].values()))[0]
    moved = next(n for n, f in index["weight_map"].items() if f != first_shard)
    index["weight_map"][moved] = first_shard
    (bad_index / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=rf"places tensor {re.escape(moved)} in {first_shard}, but that shard"):
        CheckpointReader(bad_index)


# selecting names


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_linear_scope_is_the_seven_projections_of_every_block(tiny_model_dirs, arch):
    reader = CheckpointReader(tiny_model_dirs[arch])
    names = select_names(reader, "linear")
    assert len(names) == 4 * len(LINEAR_SUFFIXES)
    assert all(n.endswith(".weight") and n.split(".")[-2] in LINEAR_SUFFIXES for n in names)
    assert not any("bias" in n or "norm" in n or "embed" in n for n in names)


def test_all_2d_scope_takes_embeddings_and_processes_tied_ones_once(tiny_model_dirs, tmp_path):
    llama = CheckpointReader(tiny_model_dirs["llama"])
    names = select_names(llama, "all_2d")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(names)
    assert all(len(llama.shape(n)) == 2 for n in names) and len(names) == 4 * 7 + 2

    gemma = CheckpointReader(tiny_model_dirs["gemma3"])  # tied: lm_head is not stored at all
    assert "lm_head.weight" not in select_names(gemma, "all_2d")

    tied = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "tied")  # tied, but both stored
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert select_names(CheckpointReader(tied), "all_2d") == [n for n in names if n != "lm_head.weight"]


def test_unknown_architectures_need_a_module_map(tiny_model_dirs, tmp_path):
    folder = shutil.copytree(tiny_model_dirs["llama"], tmp_path / "other")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "newarch"}))
    reader = CheckpointReader(folder)
    with pytest.raises(ConfigError, match=r"'newarch' model, which has no linear-scope pattern.*module_map="):
        select_names(reader, "linear")
    only_mlp = select_names(reader, "linear", {"newarch": r"model\.layers\.\d+\.mlp\.\w+_proj\.weight"})
    assert len(only_mlp) == 12
    with pytest.raises(ConfigError, match="selects no tensor"):
        select_names(reader, "linear", {"newarch": r"nothing"})
    with pytest.raises(ConfigError, match="unknown param_scope"):
        select_names(reader, "conv")  # type: ignore[arg-type]
    assert set(LINEAR_PATTERNS) >= {"llama", "mistral", "qwen2", "qwen3", "gemma3"}


# aligning roles


def test_aligned_yields_every_role_in_fp32(tiny_model_dirs, sharded_dir):
    readers = {"aligned_model": CheckpointReader(tiny_model_dirs["llama"]),
               "target_model": CheckpointReader(sharded_dir)}
    names = select_names(readers["target_model"], "linear")
    seen = []
    for name, tensors in aligned(readers, names):
        assert set(tensors) == set(readers)
        assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors.values())
        assert torch.equal(tensors["aligned_model"], tensors["target_model"])
        seen.append(name)
    assert seen == names


# read-ahead


def _header_ranges(folder: Path) -> dict[str, tuple[str, int, int]]:
    """name → (file, absolute start, stop) of its bytes, from each shard's header parsed here (8-byte little-endian
    length, JSON, then the data section the offsets count from)."""
    ranges = {}
    for path in sorted(folder.glob("*.safetensors")):
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        for name, entry in json.loads(raw[8:8 + length]).items():
            if name != "__metadata__":
                start, stop = entry["data_offsets"]
                ranges[name] = (path.name, 8 + length + start, 8 + length + stop)
    return ranges


@pytest.fixture
def advised(monkeypatch) -> list[tuple[str, int, int]]:
    """Every ``posix_fadvise`` call as (file name, start, stop), with WILLNEED checked."""
    calls: list[tuple[str, int, int]] = []

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_WILLNEED
        calls.append((Path(os.readlink(f"/proc/self/fd/{fd}")).name, offset, offset + length))

    monkeypatch.setattr(os, "posix_fadvise", record, raising=False)
    return calls


def _merged(calls: list[tuple[str, int, int]]) -> dict[str, list[tuple[int, int]]]:
    """Per file, the advised ranges in call order with touching ones joined (each byte advised once: no overlap)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for file, start, stop in calls:
        ranges = out.setdefault(file, [])
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            assert all(stop <= a or start >= b for a, b in ranges), f"{file} {start}..{stop} advised twice"
            ranges.append((start, stop))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise, /proc/self/fd")
def test_will_need_advises_the_bytes_of_the_header_in_bounded_steps(sharded_dir, advised, monkeypatch):
    monkeypatch.setattr(reader_module, "_ADVISE_STEP", 1000)
    reader = CheckpointReader(sharded_dir)
    ranges = _header_ranges(sharded_dir)
    for name in reader.names():
        advised.clear()
        reader.will_need(name)
        file, start, stop = ranges[name]
        assert all(b - a <= 1000 and f == file for f, a, b in advised)
        assert _merged(advised) == {file: [(start, stop)]}, name
    name = "model.embed_tokens.weight"
    file, start, stop = ranges[name]
    advised.clear()
    reader.will_need(name, 100, 50)
    reader.will_need(name, stop - start - 10, 1000)  # clipped to the tensor
    assert advised == [(file, start + 100, start + 150), (file, stop - 10, stop)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="posix_fadvise, /proc/self/fd")
@pytest.mark.parametrize("window", [0, 20_000, 10**9])
def test_aligned_reads_ahead_a_bounded_window_in_visiting_order(tiny_model_dirs, sharded_dir, advised, window):
    folders = {"aligned_model": tiny_model_dirs["llama"], "target_model": sharded_dir}
    readers = {role: CheckpointReader(folder) for role, folder in folders.items()}
    names = select_names(readers["target_model"], "linear")
    ranges = {role: _header_ranges(folder) for role, folder in folders.items()}
    sizes = [readers["target_model"].nbytes(name) for name in names]
    for i, (name, _) in enumerate(aligned(readers, names, dtype=None, read_ahead=window)):
        # By now every role has name i and the next `window` bytes after it asked for, in the order visited.
        end = sum(sizes[:i + 1]) + window
        expected: list[tuple[str, int, int]] = []
        done = 0
        for other, size in zip(names, sizes, strict=True):
            if done >= end:
                break
            for role in readers:
                file, start, _ = ranges[role][other]
                expected.append((role, file, start, start + min(size, end - done)))
            done += size
        for role in readers:
            files = {file for file, _, _ in ranges[role].values()}
            want = [(file, a, b) for r, file, a, b in expected if r == role]
            assert _merged([c for c in advised if c[0] in files]) == _merged(want), (name, role)
    assert sum(b - a for _, a, b in advised) == 2 * sum(sizes)  # every byte once, nothing more


def test_aligned_yields_the_same_tensors_without_posix_fadvise(tiny_model_dirs, sharded_dir, monkeypatch):
    readers = {"aligned_model": CheckpointReader(tiny_model_dirs["llama"]),
               "target_model": CheckpointReader(sharded_dir)}
    names = select_names(readers["target_model"], "linear")
    before = [(n, {r: t.clone() for r, t in x.items()}) for n, x in aligned(readers, names, read_ahead=None)]
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    after = list(aligned(readers, names))
    assert [n for n, _ in after] == names
    for (name, x), (_, y) in zip(before, after, strict=True):
        assert all(torch.equal(x[r].view(torch.uint8), y[r].view(torch.uint8)) for r in readers), name


def test_a_shape_mismatch_names_the_tensor_the_roles_and_the_shapes(tiny_model_dirs, narrow_dir):
    readers = {"aligned_model": CheckpointReader(tiny_model_dirs["llama"]),
               "target_model": CheckpointReader(narrow_dir)}
    stream = aligned(readers, select_names(readers["aligned_model"], "linear"))
    with pytest.raises(ModelMismatchError, match=re.escape(
            "tensor model.layers.0.mlp.down_proj.weight: aligned_model has (64, 128), target_model has (64, 96)")):
        next(stream)
    with pytest.raises(ModelMismatchError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight: "):
        plan(readers, select_names(readers["aligned_model"], "linear"), svd=False)


def test_a_missing_tensor_names_the_role_that_lacks_it(tiny_model_dirs):
    readers = {"base_model": CheckpointReader(tiny_model_dirs["llama"]),
               "target_model": CheckpointReader(tiny_model_dirs["qwen2"])}
    with pytest.raises(ModelMismatchError, match=r"tensor model\.layers\.0\.self_attn\.q_proj\.bias: missing from "
                                                 r"base_model \(.*\) but present in target_model"):
        next(aligned(readers, ["model.layers.0.self_attn.q_proj.bias"]))
    with pytest.raises(ConfigError, match="no checkpoints"):
        next(aligned({}, ["x"]))


# writing


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_a_copied_checkpoint_is_bit_exact_and_loads(tiny_model_dirs, tmp_path, arch):
    template = tiny_model_dirs[arch]
    out = tmp_path / "copy"
    with CheckpointWriter(out, template=template) as writer:
        assert writer.finish() == out
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, *(p.name for p in template.iterdir())])
    assert (out / "model.safetensors").read_bytes() != b""
    original, written = CheckpointReader(template), CheckpointReader(out)
    assert written.names() == original.names()
    for name in original.names():
        assert torch.equal(written.get(name), original.get(name)), name
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:  # the safetensors library reads it
        assert fh.metadata() == {"format": "pt"}
    expected = build_tiny_model(arch)[0].state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    via_toolkit = safetypatch.load_model(str(out), dtype="float32", device="cpu").model.state_dict()
    assert all(torch.equal(via_toolkit[k], expected[k]) for k in expected)


def test_sharded_writes_are_cast_to_the_template_dtype_and_load(tmp_path):
    model, tok = build_tiny_model("llama")
    template = _save(model.to(torch.bfloat16), tmp_path / "bf16")
    tok.save_pretrained(template)
    reader = CheckpointReader(template)
    names = select_names(reader, "linear")
    out = tmp_path / "doubled"
    with CheckpointWriter(out, template=template, max_shard_bytes=40_000) as writer:
        for name, tensors in aligned({"target_model": reader}, names):
            writer.add(name, 2 * tensors["target_model"])  # fp32, cast back to bf16 on write
        writer.finish({"restore.json": "{}\n"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert index["metadata"]["total_size"] == sum(reader.nbytes(n) for n in reader.names())
    assert (out / "restore.json").read_text() == "{}\n" and (out / "tokenizer.json").is_file()
    written = CheckpointReader(out)
    for name in reader.names():
        factor = 2 if name in names else 1
        assert written.dtype(name) == torch.bfloat16
        assert torch.equal(written.get(name), factor * reader.get(name)), name
    for shard in shards:  # every shard is a valid safetensors file on its own
        assert safetensors.torch.load_file(str(out / shard))
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    assert torch.equal(loaded.state_dict()[names[0]], 2 * reader.get(names[0]))


def _doubled(template: Path, out: Path) -> bytes:
    reader = CheckpointReader(template)
    with CheckpointWriter(out, template=template) as writer:
        for name, tensors in aligned({"target_model": reader}, select_names(reader, "linear")):
            writer.add(name, Elementwise(tensors, lambda t: 2 * t["target_model"], chunk_elements=1000))
        writer.finish()
    return (out / "model.safetensors").read_bytes()


def test_shards_are_written_back_window_by_window_with_the_same_bytes(tiny_model_dirs, tmp_path, monkeypatch):
    template = tiny_model_dirs["llama"]
    monkeypatch.setattr(writer_module, "_SYNC_FILE_RANGE", None)  # through the page cache only
    expected = _doubled(template, tmp_path / "plain")
    monkeypatch.undo()
    window = 16 * 1024
    monkeypatch.setattr(writer_module, "WRITE_BACK_BYTES", window)
    if writer_module._SYNC_FILE_RANGE is not None:  # the real system calls, small windows
        assert _doubled(template, tmp_path / "real") == expected
    calls: list[tuple[str, int, int]] = []
    monkeypatch.setattr(writer_module, "_SYNC_FILE_RANGE", lambda *args: 0)
    monkeypatch.setattr(writer_module, "_sync_range", lambda fd, start, end, flags: calls.append(
        ("write" if flags == writer_module._SYNC_WRITE else "wait", start, end)))
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, start, length, advice: calls.append(
        ("drop" if advice == os.POSIX_FADV_DONTNEED else "advise", start, start + length)))
    assert _doubled(template, tmp_path / "spied") == expected
    handed = [(start, end) for kind, start, end in calls if kind == "write"]
    waited = [(start, end) for kind, start, end in calls if kind == "wait"]
    dropped = [(start, end) for kind, start, end in calls if kind == "drop"]
    assert len(handed) > 10 and waited == dropped
    assert waited == handed[:len(waited)]  # every range is waited for and dropped a window after it was handed
    assert 0 < len(handed) - len(waited) <= 2  # the last window stays with the kernel
    data_start = 8 + int.from_bytes(expected[:8], "little")
    linear = sum(CheckpointReader(template).nbytes(n) for n in select_names(CheckpointReader(template), "linear"))
    assert sum(end - start for start, end in handed) > linear - window  # all but the last window was handed
    assert all(start >= data_start and end <= len(expected) for start, end in handed)


def test_write_back_turns_itself_off_where_the_file_system_refuses_it(tiny_model_dirs, tmp_path, monkeypatch):
    template = tiny_model_dirs["llama"]
    monkeypatch.setattr(writer_module, "WRITE_BACK_BYTES", 16 * 1024)
    calls = []

    def refuse(fd, start, end, flags):
        calls.append(flags)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(writer_module, "_SYNC_FILE_RANGE", lambda *args: -1)
    monkeypatch.setattr(writer_module, "_sync_range", refuse)
    reader = CheckpointReader(template)
    written = _doubled(template, tmp_path / "refused")
    assert len(calls) == 1  # tried once, then written through the page cache
    out = CheckpointReader(tmp_path / "refused")
    name = select_names(reader, "linear")[0]
    assert written and torch.equal(out.get(name), 2 * reader.get(name))


def test_shards_respect_the_size_cap_unless_a_tensor_is_bigger(tiny_model_dirs, tmp_path):
    template = CheckpointReader(tiny_model_dirs["llama"])
    cap = 40_000
    out = tmp_path / "capped"
    with CheckpointWriter(out, template=template.folder, max_shard_bytes=cap) as writer:
        writer.finish()
    written = CheckpointReader(out)
    shards: dict[str, list[str]] = {}
    for name in written.names():
        shards.setdefault(written.info(name).file, []).append(name)
    assert len(shards) > 3
    for members in shards.values():
        assert len(members) == 1 or sum(written.nbytes(n) for n in members) <= cap, members
    assert any(written.nbytes(members[0]) > cap for members in shards.values())  # the embedding stands alone


def test_nothing_is_left_behind_on_failure(tiny_model_dirs, tmp_path):
    template = tiny_model_dirs["llama"]
    reader = CheckpointReader(template)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(out, template=template) as writer:
        writer.add("model.norm.weight", reader.get("model.norm.weight"))
        raise RuntimeError("boom")
    assert _leftovers(tmp_path, "out") == []

    with pytest.raises(ModelError, match="contains NaN or Inf"), CheckpointWriter(out, template=template) as writer:
        writer.add("model.norm.weight", torch.full((64,), float("nan")))
    assert _leftovers(tmp_path, "out") == []

    with pytest.raises(ConfigError, match="would replace the file"), \
            CheckpointWriter(out, template=template) as writer:
        writer.finish({"config.json": "{}"})
    assert _leftovers(tmp_path, "out") == []

    with pytest.raises(ModelError, match=r"closed without finish\(\)"), CheckpointWriter(out, template=template):
        pass
    assert _leftovers(tmp_path, "out") == []


def test_writer_refuses_what_would_not_load_as_the_template(tiny_model_dirs, tmp_path):
    template = tiny_model_dirs["llama"]
    with CheckpointWriter(tmp_path / "out", template=template) as writer:
        with pytest.raises(ModelMismatchError, match=r"model\.norm\.weight .* is \(32,\), but the template .*\(64,\)"):
            writer.add("model.norm.weight", torch.ones(32))
        with pytest.raises(ModelError, match=r"'model\.norm\.weights' is not in the template.*Did you mean"):
            writer.add("model.norm.weights", torch.ones(64))
        writer.add("model.norm.weight", torch.ones(64))
        with pytest.raises(ModelError, match="already written"):
            writer.add("model.norm.weight", torch.ones(64))
        writer.abort()
    assert _leftovers(tmp_path, "out") == []
    with pytest.raises(ConfigError, match="max_shard_bytes must be positive"):
        CheckpointWriter(tmp_path / "out", template=template, max_shard_bytes=0)


def test_an_overflow_of_the_storage_dtype_is_refused(tmp_path):
    model, _ = build_tiny_model("llama")
    template = _save(model.half(), tmp_path / "fp16")
    with CheckpointWriter(tmp_path / "out", template=template) as writer:
        with pytest.raises(ModelError, match=r"model\.norm\.weight .* contains NaN or Inf as torch\.float16"):
            writer.add("model.norm.weight", torch.full((64,), 1e6))  # finite in fp32, inf in fp16
        writer.add("model.norm.weight", torch.full((64,), 2.0))
        writer.finish()
    assert torch.equal(CheckpointReader(tmp_path / "out").get("model.norm.weight"), torch.full((64,), 2.0).half())


def test_overwrite_is_refused_unless_asked(tiny_model_dirs, tmp_path):
    template = tiny_model_dirs["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="already exists; pass overwrite=True"):
        CheckpointWriter(out, template=template)
    assert (out / "keep.txt").read_text() == "old"
    with pytest.raises(OutputExistsError, match="is a folder that safetypatch did not write"):
        CheckpointWriter(out, template=template, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and _leftovers(tmp_path, "out") == [out]
    (out / "keep.txt").unlink()  # an empty folder may be replaced, and so may an output this tool wrote
    for _ in range(2):
        with CheckpointWriter(out, template=template, overwrite=True) as writer:
            writer.finish()
    assert (out / MARKER).is_file() and (out / "model.safetensors").is_file()


# planning


def test_plan_counts_what_is_read_and_bounds_the_peak(tiny_model_dirs, sharded_dir):
    readers = {"base_model": CheckpointReader(tiny_model_dirs["llama"]),
               "aligned_model": CheckpointReader(sharded_dir),
               "target_model": CheckpointReader(tiny_model_dirs["llama"])}
    names = select_names(readers["target_model"], "linear")
    no_svd, with_svd = plan(readers, names, svd=False), plan(readers, names, svd=True)
    per_role = sum(readers["base_model"].nbytes(n) for n in names)
    assert no_svd.n_tensors == len(names) == 28
    assert no_svd.bytes_read == dict.fromkeys(readers, per_role)
    assert no_svd.largest.endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    largest_bytes = readers["base_model"].nbytes(no_svd.largest)
    assert largest_bytes == 128 * 64 * 4
    assert no_svd.peak_host_bytes >= len(readers) * largest_bytes
    assert no_svd.peak_host_bytes < per_role  # a few tensors, not a model
    assert with_svd.peak_host_bytes + with_svd.peak_device_bytes > no_svd.peak_host_bytes
    text = with_svd.describe()
    assert "tensors streamed: 28 (with SVD" in text and "largest tensor: model.layers.0.mlp." in text
    assert "expected peak memory:" in text
    with pytest.raises(ConfigError, match="nothing to stream"):
        plan(readers, [], svd=False)


def test_compute_device_prefers_a_gpu():
    assert compute_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
