"""llama.cpp's layout of a Hugging Face checkpoint in a GGUF file, and a base GGUF read for export (docs/gguf.md).

Names come from the ``gguf`` package, the one llama.cpp's ``convert_hf_to_gguf.py`` uses: the weight of module
``model.layers.3.self_attn.q_proj`` is tensor ``blk.3.attn_q.weight`` through ``gguf.TensorNameMap`` of the file's
architecture (only tensors in ``gguf.MODEL_TENSORS`` of that architecture are mapped); no table of ours repeats it.

Layout (read from ``gguf_writer.py`` and ``convert_hf_to_gguf.py``): a GGUF tensor's ``shape`` lists ggml's
dimensions innermost first, [ne0, ne1] = [d_in, d_out], so its bytes are the rows of the PyTorch (d_out, d_in)
weight, in order, except where the conversion reorders rows. It does so for q_proj and k_proj of architectures
whose llama.cpp graph rotates adjacent pairs of a head's dimensions (rope type NORM: ``llama``, including Mistral
checkpoints, which convert as ``llama``): ``LlamaModel.permute`` with n_head for q and n_head_kv for k, which
:func:`permute_rows` repeats. Architectures whose graph rotates the two halves of a head, as transformers does
(rope type NEOX: ``qwen2``, ``qwen3``, ``gemma3``), keep the order. Other architectures are refused: their layout
has not been checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from safetypatch.errors import ModelError, ModelMismatchError


@dataclass(frozen=True)
class GGUFArchitecture:
    """One architecture export supports.

    Attributes:
        name: ``general.architecture`` in the GGUF file (a ``gguf.MODEL_ARCH_NAMES`` value).
        model_types: the transformers ``model_type`` values that convert to it.
        permute_qk: whether the conversion permutes the rows of q_proj and k_proj (rope type NORM).
    """

    name: str
    model_types: tuple[str, ...]
    permute_qk: bool

    @property
    def gguf_arch(self) -> Any:
        """The ``gguf.MODEL_ARCH`` member."""
        import gguf

        return next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == self.name)


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    arch.name: arch for arch in (
        GGUFArchitecture("llama", ("llama", "mistral"), permute_qk=True),
        GGUFArchitecture("qwen2", ("qwen2",), permute_qk=False),
        GGUFArchitecture("qwen3", ("qwen3",), permute_qk=False),
        GGUFArchitecture("gemma3", ("gemma3", "gemma3_text"), permute_qk=False),
    )
}
"""GGUF architecture name → how export writes it; anything else is refused."""


def permute_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of an HF q_proj / k_proj weight (or of its LoRA B factor) in llama.cpp's order: convert_hf_to_gguf.py's
    ``LlamaModel.permute`` (``reshape(n_head, 2, d // n_head // 2, ...).swapaxes(1, 2)``). Within each head the
    first half of the rows (the real parts transformers rotates with the second half) is interleaved with the
    second half. ``n_head`` is the head count of the weight: n_head for q, n_head_kv for k. Columns are untouched,
    so it commutes with a product on the right: permute_rows(B) @ A = permute_rows(B @ A).

    Raises:
        ModelMismatchError: the row count is not a multiple of 2·n_head.
    """
    d_out = rows.shape[0]
    if n_head <= 0 or d_out % (2 * n_head):
        raise ModelMismatchError(f"cannot put {d_out} rows into llama.cpp's q/k order for {n_head} heads: the rows "
                                 f"are not a multiple of 2·{n_head}. The model's head count does not fit its weights.")
    return rows.reshape(n_head, 2, d_out // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def architecture(name: str, where: Path | str) -> GGUFArchitecture:
    """The supported architecture ``name`` of the file ``where``.

    Raises:
        ModelError: the architecture is not one export supports (named, with the supported ones and what to do).
    """
    if name not in ARCHITECTURES:
        raise ModelError(f"{where} is a GGUF of architecture {name!r}, which safetypatch export does not support "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))}): how llama.cpp lays out its attention "
                         "weights has not been checked. Use the patch with `safetypatch apply` (a PEFT adapter or a "
                         "merged Hugging Face folder) instead.")
    return ARCHITECTURES[name]


@dataclass
class BaseGGUF:
    """A model GGUF file read lazily (memory-mapped): its architecture, head counts and tensors.

    Attributes:
        path: the file.
        reader: the ``gguf.GGUFReader``.
        architecture: the supported architecture it declares.
        n_blocks, n_head, n_head_kv: ``{arch}.block_count``, ``{arch}.attention.head_count(_kv)``.
        tensors: tensor name → ``gguf.ReaderTensor``, in file order.
    """

    path: Path
    reader: Any
    architecture: GGUFArchitecture
    n_blocks: int
    n_head: int
    n_head_kv: int
    tensors: dict[str, Any]

    @cached_property
    def _names(self) -> Any:
        import gguf

        return gguf.get_tensor_name_map(self.architecture.gguf_arch, self.n_blocks)

    def value(self, key: str) -> Any:
        """The metadata value of ``key`` (None when absent)."""
        field = self.reader.fields.get(key)
        return None if field is None else field.contents()

    @property
    def file_type(self) -> int | None:
        """``general.file_type`` (a ``gguf.LlamaFileType`` value), or None."""
        value = self.value("general.file_type")
        return None if value is None else int(value)

    def tensor_name(self, module: str) -> str:
        """The GGUF tensor holding the weight of HF module ``module`` (``model.layers.0.mlp.up_proj`` →
        ``blk.0.ffn_up.weight``), present in this file.

        Raises:
            ModelMismatchError: ``gguf`` maps no tensor of this architecture to the module, or the file lacks it.
        """
        name = self._names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ModelMismatchError(
                f"module {module!r} has no tensor in llama.cpp's {self.architecture.name} layout (gguf's "
                f"TensorNameMap maps none to it), so {self.path.name} cannot carry it. A patch for another "
                "architecture, or a module llama.cpp does not convert; train the patch without it.")
        if name not in self.tensors:
            tied = " (its output layer is tied to token_embd.weight)" if name == "output.weight" else ""
            raise ModelMismatchError(f"module {module!r} is tensor {name} in llama.cpp's layout, but {self.path} has "
                                     f"no such tensor{tied}. Export against the GGUF of the patch's base model, or "
                                     "train the patch without this module.")
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        """The PyTorch shape of tensor ``name`` (the reverse of GGUF's ne order): (d_out, d_in) for a weight."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def weight(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantised to float32 in PyTorch shape, in the file's row order."""
        import gguf

        tensor = self.tensors[name]
        return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(
            self.shape(name))

    def to_file_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (an HF weight of tensor ``name``, or its B factor) in the file's row order: permuted for the
        q and k tensors of an architecture with ``permute_qk``, else as they are."""
        if self.architecture.permute_qk:
            kind = _qk_kind(name)
            if kind is not None:
                return permute_rows(rows, self.n_head if kind == "q" else self.n_head_kv)
        return rows


def _qk_kind(name: str) -> str | None:
    """``q`` or ``k`` when ``name`` is a block's query or key weight in gguf's naming, else None."""
    import gguf

    for kind, tensor in (("q", gguf.MODEL_TENSOR.ATTN_Q), ("k", gguf.MODEL_TENSOR.ATTN_K)):
        pattern = re.escape(gguf.TENSOR_NAMES[tensor]).replace(re.escape("{bid}"), r"\d+") + r"\.weight"
        if re.fullmatch(pattern, name):
            return kind
    return None


def read_base_gguf(path: Path) -> BaseGGUF:
    """Open the model GGUF ``path`` (memory-mapped) and read what export needs.

    Raises:
        ModelError: the file is missing or not a GGUF, is a LoRA adapter rather than a model, lacks its block or
            head counts, or declares an architecture export does not support.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"base GGUF {path} does not exist. Give the GGUF file of the model the patch was trained on "
                         "(the one llama.cpp loads).")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise ModelError(f"{path} could not be read as a GGUF file ({type(exc).__name__}: {exc}). Check that the file "
                         "is complete.") from exc
    fields = reader.fields

    def value(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    if value("general.type") == "adapter":
        raise ModelError(f"{path} is a GGUF adapter, not a model; give the base model's GGUF file.")
    arch_name = value("general.architecture")
    arch = architecture(str(arch_name), path)
    counts = {}
    for key in (f"{arch.name}.block_count", f"{arch.name}.attention.head_count"):
        counts[key] = value(key)
        if not isinstance(counts[key], int):
            raise ModelError(f"{path}: metadata {key} is {counts[key]!r}, not one integer; the file is not a "
                             f"{arch.name} model llama.cpp can load. Convert it again with convert_hf_to_gguf.py.")
    n_head = counts[f"{arch.name}.attention.head_count"]
    n_head_kv = value(f"{arch.name}.attention.head_count_kv")
    return BaseGGUF(path, reader, arch, counts[f"{arch.name}.block_count"], n_head,
                    int(n_head_kv) if isinstance(n_head_kv, int) else n_head,
                    {tensor.name: tensor for tensor in reader.tensors})
