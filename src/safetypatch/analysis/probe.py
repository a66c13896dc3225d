"""The linear-probe ceiling: how well the model's own hidden states separate harmful from benign prompts.

A logistic regression on the residual stream at the last token of the chat-templated user turn (generation prompt
included, :func:`safetypatch.analysis.hidden.residual_states`), one decoder block's output at a time, trained on the
same train halves a safety patch is trained on. The block is chosen by seeded, stratified k-fold cross-validation;
the probe refitted there on every training prompt flags a held-out prompt as harmful when its probability exceeds
:data:`THRESHOLD`. The share it flags per held-out set is the separation the representations allow with that data:
an upper bar for a patch's refusal rate on harmful sets, and a floor for its over-refusal on benign ones.

Features are standardised with the training rows' mean and standard deviation; the weights minimise the (optionally
class-balanced) mean log-loss plus ``l2 / 2 · ‖w‖²`` (the intercept is not penalised), in float64 with L-BFGS from
zero. Everything is deterministic given the data and the seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from safetypatch.errors import ConfigError, DataError

THRESHOLD = 0.5
"""A prompt is flagged harmful when the probe's probability exceeds this."""


@dataclass(frozen=True)
class LinearProbe:
    """A fitted logistic-regression probe on standardised features.

    Attributes:
        mean: per-feature mean of the training rows (float64).
        scale: per-feature standard deviation of the training rows (1 where it is 0).
        weight: coefficients on the standardised features.
        bias: the intercept.
        iterations: L-BFGS iterations taken.
        gradient: largest absolute entry of the objective's gradient at the solution (how converged it is).
    """

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float
    iterations: int
    gradient: float

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``w · (x − mean) / scale + b`` per row of ``features`` (``[n, d]``), float64."""
        return ((features.double() - self.mean) / self.scale) @ self.weight + self.bias

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        """P(harmful) per row."""
        return torch.sigmoid(self.logits(features))

    def flags(self, features: torch.Tensor) -> torch.Tensor:
        """True where the probability exceeds :data:`THRESHOLD`."""
        return self.probability(features) > THRESHOLD


def fit_probe(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-3, balanced: bool = True,
              max_iter: int = 1000) -> LinearProbe:
    """Fit an L2-regularised logistic regression on standardised features with L-BFGS in float64.

    Args:
        features: ``[n, d]``.
        labels: ``[n]`` of 0 (benign) and 1 (harmful).
        l2: weight of ``½‖w‖²`` against the mean log-loss.
        balanced: weigh each class to half the loss, whatever its count.
        max_iter: most L-BFGS iterations.

    Returns:
        The :class:`LinearProbe`.

    Raises:
        DataError: the rows do not hold both labels, or features and labels disagree in length.
        ConfigError: a negative ``l2``.
    """
    y = _check_labels(features, labels)
    if l2 < 0:
        raise ConfigError(f"l2 must be non-negative, got {l2}.")
    x = features.double()
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z = (x - mean) / scale
    counts = torch.bincount(y.long(), minlength=2).double()
    per_row = (0.5 / counts)[y.long()] if balanced else torch.full_like(y, 1.0 / len(y))
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ params[:-1] + params[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=per_row, reduction="sum")
        loss = loss + 0.5 * l2 * params[:-1].square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    objective()
    gradient = float(torch.zeros(1) if params.grad is None else params.grad.abs().max())
    fitted = params.detach()
    return LinearProbe(mean, scale, fitted[:-1].clone(), float(fitted[-1]),
                       int(optimizer.state[params].get("n_iter", 0)), gradient)


def stratified_folds(labels: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """A fold index in ``0..k-1`` per row: each label's rows shuffled with ``seed`` and dealt round-robin, so every
    fold holds each label's rows to within one.

    Raises:
        ConfigError: ``k`` below 2, or more folds than rows of the rarer label.
    """
    y = labels.long().tolist()
    rarest = min(y.count(0), y.count(1))
    if k < 2 or k > rarest:
        raise ConfigError(f"k-fold cross-validation needs 2 <= k <= the rarer label's {rarest} rows; got k={k}.")
    rng = random.Random(seed)
    folds = torch.empty(len(y), dtype=torch.long)
    for label in (0, 1):
        rows = [i for i, value in enumerate(y) if value == label]
        rng.shuffle(rows)
        for position, row in enumerate(rows):
            folds[row] = position % k
    return folds


def cross_validate(states: torch.Tensor, labels: torch.Tensor, layers: Sequence[int], k: int = 5, seed: int = 0,
                   l2: float = 1e-3, balanced: bool = True) -> dict[int, float]:
    """Cross-validated accuracy of :func:`fit_probe` per layer: the share of rows classified correctly by the probe
    fitted without their fold, on the same seeded stratified folds for every layer.

    Args:
        states: ``[n, layers, d]`` hidden states.
        labels: ``[n]`` of 0 and 1.
        layers: the layers to try (indices into ``states``' second axis).
        k: folds.
        seed: seed of the folds.
        l2: see :func:`fit_probe`.
        balanced: see :func:`fit_probe`.

    Returns:
        Layer → accuracy, in the order of ``layers``.

    Raises:
        ConfigError: a layer outside ``states``, no layer, or a bad ``k`` (see :func:`stratified_folds`).
        DataError: see :func:`fit_probe`.
    """
    _check_labels(states, labels)
    bad = [layer for layer in layers if not 0 <= layer < states.shape[1]]
    if bad or not layers:
        raise ConfigError(f"layers {list(layers)}: give at least one, each in 0..{states.shape[1] - 1}.")
    folds = stratified_folds(labels, k, seed)
    accuracy = {}
    for layer in layers:
        correct = 0
        for fold in range(k):
            held = folds == fold
            probe = fit_probe(states[~held, layer], labels[~held], l2, balanced)
            correct += int((probe.flags(states[held, layer]) == labels[held].bool()).sum())
        accuracy[layer] = correct / len(labels)
    return accuracy


def best_layer(accuracy: dict[int, float]) -> int:
    """The layer of highest cross-validated accuracy; the earliest of equals."""
    return min(accuracy, key=lambda layer: (-accuracy[layer], layer))


def _check_labels(features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The labels as float64 after checking they match the rows and hold both classes."""
    if len(features) != len(labels):
        raise DataError(f"{len(features)} feature rows but {len(labels)} labels; give one label per row.")
    y = labels.double()
    if not bool(((y == 0) | (y == 1)).all()) or len(set(y.tolist())) < 2:
        raise DataError("a probe needs labels 0 (benign) and 1 (harmful), both present; check the training sets.")
    return y
