"""Element-wise results computed chunk by chunk (weights.elementwise) and written by the CheckpointWriter: the same
bytes as the whole tensor computed at once, chunk sizes that do not divide the tensor, the finite check and the
raw copy of untouched tensors."""

from __future__ import annotations

import errno
import math
import os
from pathlib import Path

import pytest
import torch

from safetypatch.errors import ModelError
from safetypatch.weights import elementwise
from safetypatch.weights.elementwise import (
    Elementwise,
    all_finite,
    any_difference,
    chunk_ranges,
    sum_of_squares,
)
from safetypatch.weights.stream import CheckpointReader, CheckpointWriter
from tests.tiny import build_tiny_model

NAME = "model.layers.1.mlp.up_proj.weight"  # (128, 64) in the tiny llama


def _inputs(shape: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Three roles in three storage dtypes, as a mixed set of checkpoints would give."""
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(shape, generator=g).to(torch.bfloat16), "b": torch.randn(shape, generator=g),
            "c": torch.randn(shape, generator=g).half()}


def _op(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """c + 0.3 (a − b), in the order a method would write it."""
    return x["c"] + 0.3 * (x["a"] - x["b"])


def _op_in_place(x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same, overwriting its input buffers as RESTA's chunk function does."""
    step = torch.sub(x["a"], x["b"], out=x["b"]).mul_(0.3)
    return x["c"].add_(step)


def test_chunk_ranges_cover_every_element_once():
    assert list(chunk_ranges(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(chunk_ranges(8, 4)) == [(0, 4), (4, 8)]
    assert list(chunk_ranges(0, 4)) == []


@pytest.mark.parametrize("shape", [(13, 7), (5,), (64, 32), (3, 4, 5)])
@pytest.mark.parametrize("chunk", [1, 8, 50, 1 << 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_equals_the_whole_tensor_bit_for_bit(shape, chunk, dtype):
    x = _inputs(shape)
    whole = _op({role: t.float() for role, t in x.items()})
    for fn in (_op, _op_in_place):
        lazy = Elementwise(x, fn, chunk_elements=chunk)
        assert lazy.shape == shape and lazy.numel == math.prod(shape)
        got = torch.cat([c.clone() for c in lazy.chunks(dtype)])
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), whole.to(dtype).reshape(-1).view(torch.uint8))
        assert torch.equal(Elementwise(x, fn, chunk_elements=chunk).materialize(), whole)
    assert all(torch.equal(x[role], t) for role, t in _inputs(shape).items())  # inputs untouched


def test_an_elementwise_is_consumed_once_and_reports_when_done():
    done = []
    lazy = Elementwise(_inputs((9,)), _op, on_done=lambda: done.append(True), chunk_elements=4)
    chunks = lazy.chunks()
    next(chunks)
    assert done == []
    list(chunks)
    assert done == [True]
    with pytest.raises(RuntimeError, match="already consumed"):
        list(lazy.chunks())
    with pytest.raises(ValueError, match="one shape"):
        Elementwise({"a": torch.ones(3), "b": torch.ones(4)}, _op)


def test_sum_of_squares_is_accurate_and_equals_its_chunked_sum(monkeypatch):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    assert sum_of_squares(x) == pytest.approx(float((x.double() ** 2).sum()), rel=1e-6)
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", 64)
    chunked = sum(elementwise.chunk_sum_of_squares(x[i:j]) for i, j in chunk_ranges(1000))
    assert sum_of_squares(x.reshape(10, 100)) == chunked
    assert sum_of_squares(torch.zeros(0)) == 0.0


def test_all_finite_finds_every_nan_and_inf_and_survives_an_overflowing_sum():
    assert all_finite(torch.ones(10)) and all_finite(torch.zeros(0))
    assert all_finite(torch.full((4,), 3e38))  # the sum overflows, the values are finite
    assert all_finite(torch.full((4,), 3e38, dtype=torch.bfloat16))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            t = torch.ones(1000, dtype=dtype)
            t[777] = bad
            assert not all_finite(t), (bad, dtype)


def test_any_difference_is_the_any_of_the_fp32_difference(monkeypatch):
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", 100)
    a = torch.randn(1000)
    assert not any_difference(a, a.clone()) and not any_difference(torch.zeros(0), torch.zeros(0))
    for value in (1.0, float("nan")):
        b = a.clone()
        b[-1] = value if value != 1.0 else a[-1] + 1.0  # only the last element (in the last chunk) differs
        assert any_difference(a, b) == bool((a - b).any()) is True
    inf = torch.full((3,), float("inf"))
    assert any_difference(inf, inf) == bool((inf - inf).any()) is True  # inf − inf is NaN, not zero
    assert any_difference(torch.tensor([0.0]), torch.tensor([-0.0])) == bool((torch.tensor([0.0]) - -0.0).any())
    assert not any_difference(a.to(torch.bfloat16), a.to(torch.bfloat16).float())  # dtypes may differ


# writing


@pytest.fixture(scope="module")
def bf16_template(tmp_path_factory) -> Path:
    model, _ = build_tiny_model("llama")
    folder = tmp_path_factory.mktemp("bf16") / "llama"
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def _write(template: Path, out: Path, value: torch.Tensor | Elementwise) -> dict[str, torch.Tensor]:
    with CheckpointWriter(out, template=template) as writer:
        writer.add(NAME, value)
        writer.finish()
    reader = CheckpointReader(out)
    return {name: reader.get(name) for name in reader.names()}


def test_a_chunked_tensor_writes_the_bytes_of_the_whole_one(bf16_template, tmp_path, monkeypatch):
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", 1000)  # 8192 elements: 9 chunks, the last one short
    x = _inputs((128, 64))
    whole = _write(bf16_template, tmp_path / "whole", _op({role: t.float() for role, t in x.items()}))
    chunked = _write(bf16_template, tmp_path / "chunked", Elementwise(x, _op_in_place))
    assert whole.keys() == chunked.keys()
    for name, tensor in whole.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor.view(torch.uint8),
                                                              chunked[name].view(torch.uint8)), name
    assert (tmp_path / "whole" / "model.safetensors").read_bytes() == \
        (tmp_path / "chunked" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("position", [0, 4999, 8191])
def test_a_non_finite_chunk_is_refused_as_a_non_finite_tensor_is(bf16_template, tmp_path, monkeypatch, position):
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", 1000)
    x = _inputs((128, 64))
    x["c"].view(-1)[position] = float("inf")
    messages = []
    for value in (_op({role: t.float() for role, t in x.items()}), Elementwise(x, _op_in_place)):
        with pytest.raises(ModelError, match=r"contains NaN or Inf as torch\.bfloat16") as caught, \
                CheckpointWriter(tmp_path / "out", template=bf16_template) as writer:
            writer.add(NAME, value)
        messages.append(str(caught.value))
        assert not (tmp_path / "out").exists()
    assert messages[0] == messages[1]
    with CheckpointWriter(tmp_path / "out", template=bf16_template) as writer:  # a refused tensor is not written
        with pytest.raises(ModelError, match="NaN or Inf"):
            writer.add(NAME, Elementwise(x, _op_in_place))
        writer.add(NAME, torch.ones(128, 64))
        writer.finish()
    assert torch.equal(CheckpointReader(tmp_path / "out").get(NAME), torch.ones(128, 64, dtype=torch.bfloat16))


def test_an_overflow_of_the_storage_dtype_in_a_chunk_is_refused(tmp_path):
    model, _ = build_tiny_model("llama")
    model.half().save_pretrained(tmp_path / "fp16")
    x = {"a": torch.full((128, 64), 1e6)}  # finite in fp32, inf in fp16
    with pytest.raises(ModelError, match=r"contains NaN or Inf as torch\.float16"), \
            CheckpointWriter(tmp_path / "out", template=tmp_path / "fp16") as writer:
        writer.add(NAME, Elementwise(x, lambda c: c["a"]))


def test_untouched_tensors_are_copied_byte_for_byte_with_or_without_copy_file_range(bf16_template, tmp_path,
                                                                                    monkeypatch):
    _write(bf16_template, tmp_path / "kernel", torch.ones(128, 64))

    def refuse(*args):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    _write(bf16_template, tmp_path / "memory", torch.ones(128, 64))
    assert (tmp_path / "kernel" / "model.safetensors").read_bytes() == \
        (tmp_path / "memory" / "model.safetensors").read_bytes()
    original, written = CheckpointReader(bf16_template), CheckpointReader(tmp_path / "kernel")
    for name in original.names():
        if name != NAME:
            assert torch.equal(written.get(name).view(torch.uint8), original.get(name).view(torch.uint8)), name


def test_copy_rest_from_another_dtype_casts(bf16_template, tiny_model_dirs, tmp_path):
    fp32 = CheckpointReader(tiny_model_dirs["llama"])
    with CheckpointWriter(tmp_path / "out", template=bf16_template) as writer:
        assert writer.copy_rest(fp32) == len(fp32.names())
        writer.finish()
    written = CheckpointReader(tmp_path / "out")
    for name in fp32.names():
        assert torch.equal(written.get(name), fp32.get(name).to(torch.bfloat16)), name


def test_byte_range_points_at_the_stored_bytes(bf16_template):
    reader = CheckpointReader(bf16_template)
    path, offset, nbytes = reader.byte_range(NAME)
    with path.open("rb") as fh:
        fh.seek(offset)
        raw = fh.read(nbytes)
    assert raw == reader.get(NAME).reshape(-1).view(torch.uint8).numpy().tobytes()


def test_chunk_buffers_are_reused_between_tensors_without_carrying_values(monkeypatch):
    monkeypatch.setattr(elementwise, "CHUNK_ELEMENTS", 64)
    monkeypatch.setattr(elementwise._POOL, "free", {})  # buffers earlier tests left in this thread's pool
    big, small = _inputs((20, 10)), _inputs((5, 3), seed=1)
    first = Elementwise(big, _op_in_place)
    pointers = {c.data_ptr() for c in first.chunks(torch.bfloat16)}
    assert len(pointers) == 1  # one output buffer for every chunk
    second = Elementwise(small, _op_in_place)
    chunks = [c.clone() for c in second.chunks(torch.bfloat16)]
    assert torch.equal(torch.cat(chunks), _op({r: t.float() for r, t in small.items()}).to(torch.bfloat16).view(-1))
    buffer = elementwise.borrow(10)
    elementwise.give_back(buffer)
    assert elementwise.borrow(10).data_ptr() == buffer.data_ptr()
