"""The representation term of refusal-SFT: move harmful prompts' hidden states along the model's own refusal
direction, and keep benign ones from moving along it (recipe ``representation_weight``; docs/generalization.md).

The refusal direction at layer l is the difference of the mean residual-stream states (after decoder block l, at
the last prompt token) of the harmful and the benign training prompts in the unpatched model, unit-normalised
(difference of means, Arditi et al. 2024, arXiv:2406.11717; the term is in the spirit of circuit breakers and
ReFAT, which act on representations rather than on output tokens). With p = h·r̂ a prompt's projection and μ_h,
μ_b the unpatched means of the harmful and benign prompts, the term of one example at one layer is

    harmful: relu(μ_h − p)²        benign: relu(p − p₀)²

scaled by 1 / (μ_h − μ_b)², averaged over the examples of the batch and the layers, times λ. A harmful prompt the
model already places beyond the harmful mean costs nothing; one in a phrasing it places near the benign side (a
tense or frame it was not trained on) is pulled across. A benign prompt may move anywhere but further towards
refusal than where the unpatched model (p₀) had it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from safetypatch.errors import DataError
from safetypatch.models.blocks import decoder_layers
from safetypatch.train.examples import TokenizedExample


@dataclass(frozen=True)
class RefusalDirection:
    """The unpatched model's refusal direction at some layers.

    Attributes:
        layers: decoder block indices.
        direction: ``[len(layers), hidden]`` unit vectors r̂.
        harmful_mean: ``[len(layers)]`` μ_h, the mean projection of the harmful prompts.
        benign_mean: ``[len(layers)]`` μ_b, the mean projection of the benign prompts.
    """

    layers: tuple[int, ...]
    direction: torch.Tensor
    harmful_mean: torch.Tensor
    benign_mean: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records: the layers and the two means per layer."""
        return {"layers": list(self.layers), "harmful_mean": self.harmful_mean.tolist(),
                "benign_mean": self.benign_mean.tolist()}


@torch.no_grad()
def prompt_states(model: Any, examples: Sequence[TokenizedExample], layers: Sequence[int],
                  batch_size: int = 16) -> torch.Tensor:
    """Residual-stream states after the given decoder blocks at each example's last prompt token.

    Prompts are batched by length and padded on the right, after every prompt token, where a causal model's prompt
    tokens never look.

    Returns:
        ``[len(examples), len(layers), hidden]`` fp32 on the CPU, in the order of ``examples``.
    """
    blocks = decoder_layers(model)
    device = next(model.parameters()).device
    prompts = [list(ex.input_ids[: len(ex.input_ids) - sum(ex.completion_mask)]) for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = torch.empty(0)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([prompts[i] + [0] * (width - len(prompts[i])) for i in rows], device=device)
        mask = torch.tensor([[1] * len(prompts[i]) + [0] * (width - len(prompts[i])) for i in rows], device=device)
        last = torch.tensor([len(prompts[i]) - 1 for i in rows], device=device)
        with capture(blocks, layers) as states:
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        found = torch.stack([s[torch.arange(len(rows), device=device), last] for s in states], dim=1).float().cpu()
        if out.numel() == 0:
            out = torch.empty(len(examples), len(layers), found.shape[-1])
        out[torch.tensor(rows)] = found
    return out


def fit_direction(states: torch.Tensor, harmful: torch.Tensor, layers: Sequence[int]) -> RefusalDirection:
    """The difference-of-means direction of ``states`` ``[n, layers, hidden]`` between the rows flagged ``harmful``
    and the others.

    Raises:
        DataError: one side has no example, or the two means coincide at a layer.
    """
    harmful = harmful.to(torch.bool)
    if not harmful.any() or harmful.all():
        raise DataError("the representation term needs harmful and benign training examples to find the refusal "
                        f"direction; got {int(harmful.sum())} harmful of {len(harmful)}. Add retain prompts "
                        "(recipe retain_count) or set representation_weight to 0.")
    difference = states[harmful].mean(0) - states[~harmful].mean(0)
    norms = difference.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise DataError("the harmful and benign prompts have the same mean state at a representation layer; choose "
                        "other representation_layers.")
    direction = difference / norms
    projections = torch.einsum("nlh,lh->nl", states, direction)
    return RefusalDirection(tuple(layers), direction, projections[harmful].mean(0), projections[~harmful].mean(0))


def targets(direction: RefusalDirection, states: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
    """Per example and layer, the projection its hinge holds it to: μ_h for a harmful prompt (pushed up to it), its
    own unpatched projection p₀ for a benign one (kept below it). ``[n, layers]``."""
    own = torch.einsum("nlh,lh->nl", states, direction.direction)
    return torch.where(harmful.to(torch.bool)[:, None], direction.harmful_mean.expand_as(own), own)


def representation_loss(states: Sequence[torch.Tensor], positions: torch.Tensor, target: torch.Tensor,
                        harmful: torch.Tensor, direction: RefusalDirection) -> torch.Tensor:
    """The term (see the module docstring) for one batch.

    Args:
        states: per representation layer, the block's output ``[batch, seq, hidden]`` of the forward being trained.
        positions: ``[batch]`` index of each row's last prompt token.
        target: ``[batch, layers]`` from :func:`targets`.
        harmful: ``[batch]`` flags.
        direction: the refusal direction.

    Returns:
        A scalar.
    """
    rows = torch.arange(len(positions), device=positions.device)
    at = torch.stack([s[rows, positions] for s in states], dim=1).float()  # [batch, layers, hidden]
    projection = torch.einsum("blh,lh->bl", at, direction.direction.to(at.device))
    gap = torch.where(harmful.to(torch.bool)[:, None], target - projection, projection - target)
    scale = (direction.harmful_mean - direction.benign_mean).to(at.device) ** 2
    return (torch.relu(gap) ** 2 / scale).mean()


@contextlib.contextmanager
def capture(blocks: torch.nn.ModuleList, layers: Sequence[int]) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of ``blocks[l]`` for ``l`` in ``layers`` during the forward passes run inside; the list
    holds the last forward's output of each layer, in ``layers`` order."""
    found: dict[int, torch.Tensor] = {}

    def hook(index: int) -> Any:
        def keep(_module: Any, _inputs: Any, output: Any) -> None:
            found[index] = output[0] if isinstance(output, tuple) else output
        return keep

    handles = [blocks[layer].register_forward_hook(hook(layer)) for layer in layers]
    states: list[torch.Tensor] = []
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()
        states.extend(found[layer] for layer in layers if layer in found)
