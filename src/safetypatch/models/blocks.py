"""The decoder blocks of a causal LM: where hidden states are read (analysis) and steered (training)."""

from __future__ import annotations

from typing import Any

import torch

from safetypatch.errors import ModelError


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM or of a PEFT model around one.

    Raises:
        ModelError: the model has no ``layers`` list of ``num_hidden_layers`` blocks.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    expected = getattr(base.config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != expected:
        raise ModelError(f"{type(base).__name__}: no list of {expected} decoder blocks at get_decoder().layers, so "
                         "its hidden states cannot be read per layer; this architecture does not support hidden-state "
                         "measures or the representation term.")
    return layers
