"""Model fingerprints (docs/methods.md §5.8): SHA-256 over architecture fields, sorted parameter names and shapes,
and the bytes of a fixed sample of rows of every tensor, read from safetensors without loading the model."""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetypatch.errors import ModelError

if TYPE_CHECKING:
    from safetypatch.weights.reader import CheckpointReader

ARCH_FIELDS = (
    "model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)


@dataclass(frozen=True)
class Fingerprint:
    """Identity of a checkpoint's weights.

    Attributes:
        sha256: digest over ``arch``, the name/shape table and sampled rows (first, last and two inner rows)
            of every tensor, so that any full-tensor change (a merged patch, a fine-tune) changes it.
        shape_sha256: digest over ``arch`` and the name/shape table only: equal for a model and its fine-tunes.
        arch: the architecture fields of ``config.json``.
        n_tensors: number of stored tensors.
        n_params: number of stored parameters.
        revision: the resolved revision (Hub commit, pinned wheel, or None for a local folder).
    """

    sha256: str
    shape_sha256: str
    arch: dict
    n_tensors: int
    n_params: int
    revision: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder (sharded via its index, or single).

    Raises:
        ModelError: the folder holds no safetensors weights, or its index is not a JSON object with a weight map.
    """
    from safetypatch.weights.reader import read_json_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index, "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelError(f"{index} has no 'weight_map' (tensor name → shard file); the index is corrupt. "
                             "Download or write the checkpoint again.")
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(
        f"{folder} holds no model.safetensors or model.safetensors.index.json; convert .bin checkpoints "
        "with `transformers` (save_pretrained(..., safe_serialization=True)) first."
    )


def fingerprint_folder(folder: Path, revision: str | None = None) -> Fingerprint:
    """Fingerprint the HF checkpoint in ``folder`` by streaming its safetensors headers and a few tensors.

    Raises:
        ModelError: no ``config.json`` (or one that is not a JSON object), no safetensors weights, or a weights file
            or index that is truncated or corrupt (named).
    """
    from safetensors import safe_open

    from safetypatch.weights.reader import CheckpointReader, read_json_file

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    config = read_json_file(config_path, "model config")
    arch = {key: config[key] for key in ARCH_FIELDS if key in config}
    reader = CheckpointReader(folder)  # every header is checked against its file's size: a truncated file is named
    shapes = {name: reader.shape(name) for name in reader.names()}
    owner = {name: folder / reader.info(name).file for name in shapes}
    table = sorted((name, list(shape)) for name, shape in shapes.items())
    shape_digest = hashlib.sha256(json.dumps([arch, table], sort_keys=True).encode()).hexdigest()
    digest = hashlib.sha256(shape_digest.encode())
    _advise_rows(reader, shapes)
    with contextlib.ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(str(p), framework="pt")) for p in set(owner.values())}
        for name, _ in table:
            digest.update(name.encode())
            digest.update(_sample_rows(handles[owner[name]].get_slice(name), shapes[name]))
    n_params = sum(_numel(shape) for shape in shapes.values())
    return Fingerprint(digest.hexdigest(), shape_digest, arch, len(shapes), n_params, revision)


def _rows(shape: tuple[int, ...]) -> list[int]:
    """The sampled rows of a tensor of ``shape`` (at least one dimension)."""
    return sorted({0, shape[0] // 3, 2 * shape[0] // 3, shape[0] - 1})


def _sample_rows(tensor_slice, shape: tuple[int, ...]) -> bytes:
    if not shape:
        return tensor_slice[...].float().numpy().tobytes()
    return b"".join(tensor_slice[r : r + 1].float().numpy().tobytes() for r in _rows(shape))


def _advise_rows(reader: CheckpointReader, shapes: dict[str, tuple[int, ...]]) -> None:
    """Ask the kernel for the bytes of every sampled row at once, before they are read
    (:meth:`~safetypatch.weights.reader.CheckpointReader.will_need`). Read one by one through the mapping from a
    cold page cache, each row would wait for the disk, and the kernel would read a read-ahead window of MiBs around
    it: most of the checkpoint, for a few kB per tensor. A hint: the rows read the same without it."""
    for name, shape in shapes.items():
        if name in reader and shape and shape[0] > 0:
            row = reader.nbytes(name) // shape[0]
            for r in _rows(shape):
                reader.will_need(name, r * row, row)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out
