"""Versions, device and source commit recorded in every output (docs/methods.md §4.5, §5.7)."""

from __future__ import annotations

import importlib.metadata
import platform
from pathlib import Path
from typing import Any

PACKAGES = (
    "safetypatch", "torch", "transformers", "peft", "trl", "accelerate", "safetensors", "datasets", "vllm", "lm_eval",
)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that change numbers (None when absent)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_hash() -> str | None:
    """Commit of the safetypatch source checkout (a clone or a ``git worktree``), read from its git files; ``None``
    for an installed wheel."""
    for parent in Path(__file__).resolve().parents:
        found = _git_dirs(parent / ".git")
        if found is not None:
            return _resolve_head(*found)
    return None


def _git_dirs(git: Path) -> tuple[Path, Path] | None:
    """(the checkout's own git dir, the repository's common dir): equal for a clone; a worktree's ``.git`` file
    names its own dir, whose ``commondir`` file names the shared one (where branches and packed refs live)."""
    if git.is_dir():
        return git, git
    if not git.is_file() or not (text := git.read_text().strip()).startswith("gitdir: "):
        return None
    own = (git.parent / text[8:]).resolve()
    common = own / "commondir"
    return own, (own / common.read_text().strip()).resolve() if common.is_file() else own


def _resolve_head(own: Path, common: Path) -> str | None:
    head = (own / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head
    ref = head[5:]
    for folder in (own, common):
        if (folder / ref).is_file():
            return (folder / ref).read_text().strip()
    packed = common / "packed-refs"
    lines = packed.read_text().splitlines() if packed.is_file() else []
    return next((ln.split()[0] for ln in lines if ln.endswith(f" {ref}")), None)


def detect_device() -> str:
    """``cuda (<name>)`` when a GPU is visible, else ``cpu (<n> threads)``, ``cpu (<n> threads, bf16)`` on a CPU that
    multiplies bf16 in hardware (:func:`cpu_has_bf16`)."""
    import torch

    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads{', bf16' if cpu_has_bf16() else ''})"


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where bf16 autocast trains faster than
    fp32: SmolLM2-135M's forward and backward pass took 1.6-2.0x less time on a 2-core AMD EPYC with AVX512-BF16.
    Without it torch emulates bf16, which is slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def environment(device: str | None = None) -> dict[str, Any]:
    """Package versions (``None`` when not installed), Python, platform and device."""
    return {**package_versions(), "python": platform.python_version(), "platform": platform.platform(),
            "device": device or detect_device()}
