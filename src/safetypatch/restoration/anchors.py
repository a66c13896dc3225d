"""Second-moment statistics of linear-layer inputs over an anchor set, without storing activations
(docs/methods.md §3.4 step 3, the activation-aware decomposition of LSSF).

Each anchor is templated as one chat (harmful query, the aligned model's refusal). Forward pre-hooks on the chosen
``torch.nn.Linear`` modules accumulate, batch by batch in fp32, either the input moment G = Σ_t x̂_t x̂_tᵀ (d_in × d_in)
or, for modules named in ``output_side``, the output-side moment ZZᵀ = Σ_t (W x̂_t)(W x̂_t)ᵀ (d_out × d_out) with the
module's own weight and no bias: §3.4 keeps the moment on the smaller side. Modules fed the very same input tensor
(q/k/v, gate/up) share one G. Nothing but the moments outlives a batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

import torch

from safetypatch.data.schema import Example
from safetypatch.errors import ConfigError, DataError, ModelError

logger = logging.getLogger(__name__)

TokenSet = Literal["all", "response_only"]
ActNorm = Literal["global", "token_l2"]


def collect_input_moments(model: Any, tokenizer: Any, examples: Sequence[Example], modules: Sequence[str], *,
                          output_side: Collection[str] = (), tokens: TokenSet = "all", act_norm: ActNorm = "global",
                          batch_size: int = 8, max_length: int = 1024) -> dict[str, torch.Tensor]:
    """Accumulate the §3.4 second-moment matrix of every named linear module over the anchors.

    With X ∈ ℝ^{d_in×N} the module's inputs at the N counted tokens and X̂ = X / √N (``act_norm: global``; with
    ``token_l2`` each token is first scaled to unit norm), the result is G = X̂X̂ᵀ, or W G Wᵀ for ``output_side``
    modules. Modules that receive one input tensor object share one G (the same tensor is returned for each).

    Args:
        model: the aligned model (any device and dtype; run in eval mode under ``torch.inference_mode``, then
            put back in its previous mode).
        tokenizer: its tokenizer, with a chat template.
        examples: anchors; ``prompt`` is the harmful query, ``response`` the aligned model's refusal.
        modules: names of ``torch.nn.Linear`` modules (``model.layers.0.self_attn.q_proj``).
        output_side: those of ``modules`` whose moment is taken on the output side (d_in > d_out, §3.4).
        tokens: ``all`` non-pad tokens (query and refusal, the §3.4 default) or ``response_only``.
        act_norm: ``global`` (X / √N) or ``token_l2``.
        batch_size: anchors per forward pass (changes only rounding).
        max_length: most tokens per anchor; a longer anchor is an error, never truncated.

    Returns:
        module name → fp32 moment on the CPU.

    Raises:
        ConfigError: a module is missing, not a ``torch.nn.Linear``, or ``output_side`` names an unknown module.
        DataError: no anchors, an anchor without a response or over ``max_length``, a template that does not
            render the prompt as a prefix of the chat (``response_only``), or no token counted.
        ModelError: the model's forward pass feeds a module inputs the hooks cannot match to the tokens.
    """
    if not examples:
        raise DataError("collect_input_moments: the anchor set is empty; pass harmful prompts with the aligned "
                        "model's refusals as responses (docs/methods.md §3.4 step 2).")
    unknown = [name for name in output_side if name not in modules]
    if unknown:
        raise ConfigError(f"output_side names modules not in `modules`: {', '.join(unknown)}.")
    linears = linear_modules(model, modules)
    encoded = [_encode(tokenizer, example, i, tokens, max_length) for i, example in enumerate(examples)]
    collector = _MomentCollector(linears, set(output_side), act_norm)
    handles = [module.register_forward_pre_hook(collector.hook(name)) for name, module in linears.items()]
    keep_logits = {} if any(m is model.get_output_embeddings() for m in linears.values()) else {"logits_to_keep": 1}
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # fewer pad tokens; sums are unordered
    was_training = model.training
    model.eval()  # dropout would make the moments random
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [encoded[i] for i in order[start:start + batch_size]]
                input_ids, attention, counted = _pad(batch, pad_id, device)
                collector.start_batch(counted.reshape(-1))
                model(input_ids=input_ids, attention_mask=attention, use_cache=False, **keep_logits)
                collector.end_batch()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return collector.moments()


def linear_modules(model: Any, names: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """The named modules of ``model``, each checked to be a ``torch.nn.Linear``.

    Raises:
        ConfigError: a name is missing or not a linear module.
    """
    found = dict(model.named_modules())
    out = {}
    for name in names:
        module = found.get(name)
        if module is None:
            raise ConfigError(f"the aligned model has no module {name!r}; anchor statistics are taken on its linear "
                              "modules (names without the trailing .weight).")
        if not isinstance(module, torch.nn.Linear):
            raise ConfigError(f"module {name} is a {type(module).__name__}, not a torch.nn.Linear, so it has no "
                              "input activations to decompose; use param_scope `linear` for LSSF.")
        out[name] = module
    return out


def _encode(tokenizer: Any, example: Example, index: int, tokens: TokenSet,
            max_length: int) -> tuple[list[int], list[bool]]:
    """Token ids of the templated (query, refusal) chat and which of them are counted."""
    if not example.response:
        raise DataError(f"anchor {index} (prompt {example.prompt[:60]!r}) has no response; each anchor needs the "
                        "aligned model's refusal to it (docs/methods.md §3.4 step 2).")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; anchors are "
                        "templated chats. Use the aligned (instruct) model's tokenizer.")
    user = [{"role": "user", "content": example.prompt}]
    chat = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": example.response}], tokenize=False)
    ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    if len(ids) > max_length:
        raise DataError(f"anchor {index} (prompt {example.prompt[:60]!r}) is {len(ids)} tokens, over "
                        f"max_length={max_length}; raise max_length or drop the anchor (it is never truncated).")
    start = 0
    if tokens == "response_only":
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        if not chat.startswith(prompt):
            raise DataError(f"anchor {index}: the chat template renders the prompt alone ({prompt[-40:]!r}) "
                            "differently from the start of the full chat, so the response tokens cannot be found; "
                            "use tokens `all`.")
        start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return ids, [i >= start for i in range(len(ids))]


def _pad(batch: list[tuple[list[int], list[bool]]], pad_id: int,
         device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, the attention mask, and the mask of counted tokens (never a pad)."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    counted = torch.zeros(len(batch), width, dtype=torch.bool)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    for row, (tokens, mask) in enumerate(batch):
        ids[row, : len(tokens)] = torch.tensor(tokens)
        attention[row, : len(tokens)] = 1
        counted[row, : len(tokens)] = torch.tensor(mask)
    return ids.to(device), attention.to(device), counted.to(device)


class _MomentCollector:
    """Forward pre-hooks that add each counted token's (projected) input to a per-module fp32 moment."""

    def __init__(self, modules: dict[str, torch.nn.Linear], output_side: set[str], act_norm: ActNorm) -> None:
        self.modules = modules
        self.output_side = output_side
        self.act_norm = act_norm
        self.sums: dict[str, torch.Tensor] = {}
        self.owner: dict[str, str] = {}  # module → the module whose G it shares (itself when it owns one)
        self.count = 0
        self.mask: torch.Tensor | None = None
        self.first_batch = True
        self._last: tuple[torch.Tensor, str] | None = None

    def start_batch(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self.count += int(mask.sum())

    def end_batch(self) -> None:
        missing = [name for name in self.modules if name not in self.owner]
        if missing:
            raise ModelError(f"modules {', '.join(missing[:5])} were not called in the forward pass; anchor "
                             "statistics need every module to see the tokens.")
        self.first_batch, self._last, self.mask = False, None, None

    def hook(self, name: str) -> Callable[[torch.nn.Module, tuple[Any, ...]], None]:
        """The forward pre-hook of module ``name``."""
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            if self.mask is None or rows.shape[0] != self.mask.numel():
                raise ModelError(f"module {name} received an input of shape {tuple(x.shape)}, which does not line "
                                 "up with the batch's (batch × sequence) tokens; this architecture reshapes tokens "
                                 "before its linear layers and is not supported for anchor statistics.")
            if self._share(name, x):
                return
            rows = rows[self.mask].float()
            if self.act_norm == "token_l2":
                rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
            if name in self.output_side:
                rows = rows @ module.weight.float().T
            if name not in self.sums:
                self.sums[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
            self.sums[name].addmm_(rows.T, rows)

        return pre_hook

    def _share(self, name: str, x: torch.Tensor) -> bool:
        """Whether ``name``'s input is the previous input-side module's very tensor (its G is then shared)."""
        owner = name
        if name not in self.output_side:
            if self._last is not None and self._last[0] is x:
                owner = self._last[1]
            else:
                self._last = (x, name)  # holding it keeps the identity check exact until the batch ends
        if self.first_batch:
            self.owner[name] = owner
        elif self.owner[name] != owner:
            raise ModelError(f"module {name} shared its input with {self.owner[name]} in the first batch but not "
                             "in a later one; the model's forward pass is data-dependent.")
        return owner != name

    def moments(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise DataError("no anchor token was counted (with tokens `response_only`, every response is empty); "
                            "check the anchors or use tokens `all`.")
        scaled = {name: (total / self.count).cpu() for name, total in self.sums.items()}
        logger.info("anchor moments: %d modules (%d distinct inputs) over %d tokens",
                    len(self.owner), len(scaled), self.count)
        return {name: scaled[self.owner[name]] for name in self.modules}
