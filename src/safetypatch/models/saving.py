"""Write a complete Hugging Face model folder atomically and verify it by reading every tensor back
(docs/methods.md §5.2).

:func:`save_model_folder` is the one writer of full model folders (a fine-tuned descendant, a merged patch, the
full-parameter Refusal-SFT baseline): safetensors weights in size-capped shards, the tokenizer and caller sidecar
files (manifests) are written to a temporary sibling, every tensor of the model's state dict is read back from the
shards with ``safe_open`` (one tensor in memory at a time) and compared exactly, the folder is fingerprinted
(:func:`~safetypatch.models.fingerprint.fingerprint_folder`), and only then is it renamed into place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from safetypatch.errors import ConfigError, ModelError
from safetypatch.models.fingerprint import Fingerprint, fingerprint_folder, safetensors_files
from safetypatch.utils.io import atomic_path

logger = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"  # docs/methods.md §5.2
Sidecar = str | Callable[[str], str]
"""A sidecar file's text, or a function of the written folder's fingerprint sha256 that returns it."""


def save_model_folder(
    model: Any,
    tokenizer: Any,
    folder: Path,
    *,
    sidecars: Mapping[str, Sidecar] | None = None,
    overwrite: bool = False,
    max_shard_size: str | int = MAX_SHARD_SIZE,
) -> Fingerprint:
    """Write ``model`` (safetensors, sharded), ``tokenizer`` and sidecar text files as an HF model folder,
    verified tensor by tensor and moved into place atomically.

    Args:
        model: a plain transformers causal LM (not a PEFT wrapper: merge or unload an adapter first).
        tokenizer: its tokenizer, saved alongside so the folder loads on its own.
        folder: the model folder to write; loadable with ``safetypatch.load_model`` or ``from_pretrained``.
        sidecars: file name → text, or → a function of the written folder's fingerprint sha256 returning the
            text (e.g. a manifest recording ``output_fingerprint``); written after the weights are verified.
        overwrite: replace an existing ``folder``.
        max_shard_size: largest safetensors shard (transformers' ``save_pretrained`` notation, e.g. ``"5GB"``).

    Returns:
        The fingerprint of the written weights (sidecars are not part of it).

    Raises:
        OutputExistsError: ``folder`` exists and ``overwrite`` is false.
        ConfigError: a sidecar name is not a plain file name, or names a file the model or tokenizer writes.
        ModelError: a written tensor differs from the one in memory, is missing (and not tied by the model's
            config) or is unexpected; the file and tensor are named and nothing is left at ``folder``.
    """
    sidecars = dict(sidecars or {})
    for name in sidecars:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ConfigError(f"sidecar {name!r} for {folder} is not a plain file name; give a name such as "
                              "'finetune.json' (sidecars are written at the top of the model folder).")
    folder = Path(folder)
    with atomic_path(folder, overwrite) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        check_saved_tensors(tmp, model, shown_as=folder)
        fingerprint = fingerprint_folder(tmp)
        for name, content in sidecars.items():
            path = tmp / name
            if path.exists():
                raise ConfigError(f"sidecar {name!r} for {folder} would replace the file of that name the model or "
                                  "tokenizer wrote; choose another sidecar name.")
            text = content(fingerprint.sha256) if callable(content) else content
            path.write_text(text, encoding="utf-8")
    logger.info("wrote model folder %s (%d tensors, fingerprint %s…)", folder, fingerprint.n_tensors,
                fingerprint.sha256[:12])
    return fingerprint


def check_saved_tensors(written: Path, model: Any, *, shown_as: Path | None = None) -> None:
    """Require every tensor of ``model.state_dict()`` to read back exactly (values and dtype) from the safetensors
    in ``written``, shard by shard, one tensor in memory at a time.

    A tensor absent from the files is accepted only when the model's config ties it to one that was written
    (``lm_head.weight`` to ``model.embed_tokens.weight`` with ``tie_word_embeddings``); it is compared against
    that written tensor.

    Args:
        written: the folder the weights were saved to.
        model: the model in memory.
        shown_as: the folder named in errors, when ``written`` is a temporary copy of it (default ``written``).

    Raises:
        ModelError: a tensor differs, is missing and untied, or is in the files but not in the model; the
            message names the file and the tensor.
    """
    from safetensors import safe_open

    shown = Path(shown_as or written)
    expected = model.state_dict()
    tied = {target: source for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items()
            if target in expected}
    checked: set[str] = set()
    for path in safetensors_files(written):
        where = shown / path.name
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open handles are not iterable
                if key not in expected:
                    raise ModelError(f"{where}: tensor {key} is not in the {type(model).__name__} state dict; the "
                                     "folder would not load as this model. Please report this with the model's "
                                     "architecture.")
                stored = fh.get_tensor(key)
                aliases = [key, *(target for target, source in tied.items() if source == key)]
                for name in aliases:
                    _require_equal(where, name, stored, expected[name])
                checked.update(aliases)
    missing = sorted(expected.keys() - checked)
    if missing:
        raise ModelError(f"{shown}: the written safetensors lack {len(missing)} tensors of the model (e.g. "
                         f"{missing[0]}), which its config does not tie to a written one; the folder would load "
                         "with freshly initialised weights there. Save it again, or report this with the model's "
                         "architecture.")


def _require_equal(where: Path, name: str, stored: Any, tensor: Any) -> None:
    """Raise naming ``where`` and ``name`` unless ``stored`` equals ``tensor`` in shape, dtype and every value."""
    import torch

    tensor = tensor.detach().cpu()
    if stored.dtype != tensor.dtype or stored.shape != tensor.shape:
        raise ModelError(f"{where}: tensor {name} is stored as {stored.dtype} {list(stored.shape)} but is "
                         f"{tensor.dtype} {list(tensor.shape)} in memory; the weights were not written as they "
                         "are. Save it again.")
    if not torch.equal(stored, tensor):
        diff = float((stored.float() - tensor.float()).abs().max())
        raise ModelError(f"{where}: tensor {name} reads back different from the model in memory (max |Δ| "
                         f"{diff:.3g}); the weights were not written correctly. Save it again.")
