"""Training under ``accelerate launch`` (DDP, FSDP, DeepSpeed ZeRO): the shipped launcher presets, the training
precision, what a run records of its distribution, and how the trained weights of a sharded model reach the main
process (docs/methods.md §5.4).

transformers' ``Trainer`` does the distribution itself: it builds its ``Accelerator`` from the environment that
``accelerate launch`` sets. This module decides nothing about the parallelism; it only

- ships tested launcher configs (``safetypatch ls accelerate``; docs/distributed.md),
- resolves the recipe's ``precision`` against the launcher's ``mixed_precision`` (one of them decides, never both),
- has ``Trainer.save_model`` gather FSDP / ZeRO weights into a folder on the main process, where the patch is then
  checked against the modules that were trained (an empty or partial adapter never reaches users: huggingface/peft
  #2892, huggingface/trl #4416, huggingface/accelerate PR #4206).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetypatch.errors import ConfigError, ModelError, PatchError
from safetypatch.models.fingerprint import safetensors_files
from safetypatch.patch.artifact import load_patch
from safetypatch.patch.factors import Patch, lora_modules
from safetypatch.registry import Registry
from safetypatch.utils import environment

logger = logging.getLogger(__name__)

PRESET_DIR = Path(__file__).with_name("accelerate")
_GATHER_HINT = (" The sharded run's weights were not gathered for the save; with DeepSpeed ZeRO-3 set "
                "zero3_save_16bit_model: true, with FSDP fsdp_state_dict_type: FULL_STATE_DICT (the shipped zero3 "
                "and fsdp presets do).")
_LAUNCHER_PRECISIONS = {"no": None, "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class AcceleratePreset:
    """An ``accelerate launch --config_file`` preset shipped with safetypatch.

    Attributes:
        name: the preset name (the file name without ``.yaml``).
        path: the config file inside the installed package.
        description: what it sets up (the file's first line, a comment).
    """

    name: str
    path: Path
    description: str


def _load_presets() -> Registry[AcceleratePreset]:
    presets: Registry[AcceleratePreset] = Registry("accelerate preset")
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        presets.register(path.stem, AcceleratePreset(path.stem, path, first.lstrip("# ").strip()))
    return presets


PRESETS = _load_presets()


def accelerate_preset(name: str) -> AcceleratePreset:
    """The shipped preset ``name`` (``single_gpu``, ``multi_gpu``, ``fsdp``, ``zero2``, ``zero3``, ``cpu_2proc``).

    Raises:
        ConfigError: unknown name (close names and the list are given).
    """
    return PRESETS.get(name)


def resolve_precision(requested: str) -> str:
    """The precision a run trains in (docs/methods.md §3.1 *Defaults*: bf16 where the hardware has it).

    ``auto`` takes the launcher's ``mixed_precision`` (``accelerate launch --mixed_precision``, or its config file;
    read from ``ACCELERATE_MIXED_PRECISION``) when that is bf16 or fp16; otherwise bf16 on a GPU with bf16, fp16 on
    other GPUs, bf16 autocast on a CPU that multiplies bf16 natively (:func:`cpu_has_bf16`) and fp32 on other CPUs.
    The weights stay fp32 under autocast on a CPU (the optimiser's master copy). An explicit ``fp32``, ``bf16`` or
    ``fp16`` must agree with a launcher that sets one: transformers would otherwise train in the launcher's precision
    while the manifest recorded the recipe's.

    Args:
        requested: the recipe's ``precision``: ``auto``, ``fp32``, ``bf16`` or ``fp16``.

    Returns:
        ``fp32``, ``bf16`` or ``fp16``.

    Raises:
        ConfigError: the launcher's precision is not bf16, fp16 or no (fp8), or it contradicts an explicit one.
    """
    import torch

    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in _LAUNCHER_PRECISIONS:
        raise ConfigError(f"accelerate launch sets mixed_precision={launcher!r}; Refusal-SFT trains in fp32, bf16 or "
                          "fp16. Launch with --mixed_precision no (the recipe's precision then decides) or bf16.")
    from_launcher = _LAUNCHER_PRECISIONS[launcher]
    if requested == "auto":
        if from_launcher is not None:
            return from_launcher
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if environment.cpu_has_bf16() else "fp32"
    if from_launcher is not None and from_launcher != requested:
        raise ConfigError(f"the recipe sets precision={requested!r} but accelerate launch sets mixed_precision="
                          f"{launcher!r}; set one of them: --set precision=auto follows the launcher, or launch with "
                          "--mixed_precision no (the shipped presets do).")
    return requested


def check_launcher_environment() -> None:
    """Refuse launcher settings under which the model cannot be loaded whole on every process before training.

    Every process answers the retain prompts with the loaded model, so each must hold real weights; FSDP's
    ``cpu_ram_efficient_loading`` gives every process but the first an empty (meta) model.

    Raises:
        ConfigError: ``fsdp_cpu_ram_efficient_loading`` is on.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
            os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        raise ConfigError("the accelerate config sets fsdp_cpu_ram_efficient_loading: true, which loads the model "
                          "only on the first process, but every process answers retain prompts before training. Set "
                          "it to false (the shipped fsdp preset does: safetypatch ls accelerate).")


@dataclass(frozen=True)
class Launch:
    """How a training run was distributed (the ``launch`` block of a manifest's ``training``).

    Attributes:
        distributed_type: accelerate's name: ``NO``, ``MULTI_CPU``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``, …
        num_processes: processes that trained together.
        precision: the precision trained in (``fp32``, ``bf16``, ``fp16``).
        is_main_process: whether this process writes the outputs (not recorded).
    """

    distributed_type: str
    num_processes: int
    precision: str
    is_main_process: bool = True

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records."""
        return {"distributed_type": self.distributed_type, "num_processes": self.num_processes,
                "precision": self.precision}


def launch_of(trainer: Any) -> Launch:
    """The :class:`Launch` of a configured transformers ``Trainer``."""
    accelerator = trainer.accelerator
    mixed = trainer.args.mixed_precision
    return Launch(distributed_type=str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)),
                  num_processes=accelerator.num_processes, precision="fp32" if mixed == "no" else mixed,
                  is_main_process=accelerator.is_main_process)


def export_if_sharded(trainer: Any, folder: Path) -> Path | None:
    """Have ``Trainer.save_model`` gather and write the trained weights when the model is sharded or recast by its
    engine (FSDP, DeepSpeed), so that the main process can check and save what was trained.

    Every process must call this (the gather is collective); only the main process writes ``folder``. After a
    DeepSpeed run the ZeRO config is unregistered, so that the main process can load a plain copy of the base for
    the checks (``from_pretrained`` would otherwise partition it under ``deepspeed.zero.Init`` and wait forever for
    the other processes).

    Args:
        trainer: the trained ``Trainer``.
        folder: where the main process writes the gathered model (a PEFT adapter folder in LoRA mode).

    Returns:
        ``folder`` on the main process of an FSDP or DeepSpeed run; None on the other processes and when the trained
        model is whole in this process (one process, DDP), which is then saved from memory.
    """
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return None
    trainer.save_model(str(folder))
    if trainer.is_deepspeed_enabled:
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return Path(folder) if trainer.accelerator.is_main_process else None


def gathered_patch(folder: Path, trained: Any) -> Patch:
    """The LoRA patch ``Trainer.save_model`` gathered into ``folder``, checked against the modules ``trained`` has.

    Args:
        folder: the folder :func:`export_if_sharded` returned.
        trained: the trained PEFT model (its parameters may be sharded; its module tree is whole).

    Returns:
        The patch, every trained module present with the configured rank.

    Raises:
        PatchError: the adapter file is missing, empty or partial, or lacks modules that were trained
            (docs/methods.md §5.4); the message names the folder and the first missing module.
    """
    try:
        patch = load_patch(folder)
    except PatchError as exc:
        raise PatchError(f"{exc}{_GATHER_HINT}") from exc
    missing = sorted(set(lora_modules(trained, trained.active_adapter)) - set(patch.modules))
    if missing:
        raise PatchError(f"{folder}: the adapter gathered from the sharded run lacks {len(missing)} of the trained "
                         f"modules (first: {missing[0]}); only part of the model was saved (docs/methods.md §5.4). "
                         "Save it with a full state dict (FULL_STATE_DICT, zero3_save_16bit_model: true).")
    return patch


def gathered_model_folder(folder: Path) -> Path:
    """``folder``, the full model ``Trainer.save_model`` gathered a sharded full-mode run into, once it holds weights.

    Raises:
        ModelError: no safetensors weights were written (ZeRO-3 without ``zero3_save_16bit_model`` writes only its
            own partitioned checkpoint).
    """
    try:
        safetensors_files(folder)
    except ModelError as exc:
        raise ModelError(f"{exc}{_GATHER_HINT}") from exc
    return folder
