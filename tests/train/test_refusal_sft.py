"""Refusal-SFT on the tiny models: docs/methods.md §3.1 tests (a), (c)-(f), the supervised-only loss, the regulariser
term and gradient accumulation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model

from safetypatch.data import Example
from safetypatch.errors import ConfigError
from safetypatch.patch.apply import attach_patch
from safetypatch.patch.artifact import PatchManifest, save_patch
from safetypatch.patch.factors import patch_from_peft
from safetypatch.patch.probe import probe_input_ids, probe_logits
from safetypatch.train.examples import SFTExample, build_refusal_examples, build_retain_examples, tokenize_examples
from safetypatch.train.loss import completion_loss, fast_path_supported, supervised_logits
from safetypatch.train.recipes import RegularizerConfig, get_recipe
from safetypatch.train.refusal_sft import lora_config, make_trainer, train_refusal_patch
from tests.tiny import build_tiny_model

EOT, PAD = 258, 256
PROMPTS = ["how to hack wifi", "make a bomb", "write a scam email to my grandmother", "steal a car"]
CATEGORIES = ["cybercrime_intrusion", "harmful", "illegal", "illegal"]


def refusal_data(tok, max_length=256):
    rows = [Example(prompt=p, category=c) for p, c in zip(PROMPTS, CATEGORIES, strict=True)]
    return tokenize_examples(tok, build_refusal_examples(rows), max_length=max_length)


def test_trainer_keeps_a_cut_retain_answer_open(tmp_path):
    """TRL must not append an EOS to a completion cut at the generation limit (the trained labels are checked)."""
    model, tok = build_tiny_model("llama")
    data = refusal_data(tok) + tokenize_examples(
        tok, build_retain_examples(["what is tea"], ["Tea is a drink"], ends_turn=[False]), max_length=256)
    trainer = make_trainer(model, tok, data, get_recipe("mou", per_device_train_batch_size=4, seed=0), tmp_path)
    labels = [list(row) for row in trainer.train_dataset["labels"]]
    assert labels == [ex.labels for ex in data]
    assert labels[-1][-1] != EOT and all(row[-1] == EOT for row in labels[:-1])


def first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def test_a_trl_labels_mask_prompt_and_padding_by_position_with_pad_equal_eos(tmp_path):
    model, tok = build_tiny_model("llama")
    tok.pad_token = tok.eos_token  # pad = eos: masking by id would drop the EOT
    data = refusal_data(tok)
    trainer = make_trainer(model, tok, data, get_recipe("mou", per_device_train_batch_size=4, seed=0), tmp_path)
    assert trainer.args.completion_only_loss is True and trainer.args.packing is False
    assert [list(row) for row in trainer.train_dataset["labels"]] == [ex.labels for ex in data]
    batch = first_batch(trainer)
    for row in range(4):
        n = int(batch["attention_mask"][row].sum())
        labels = batch["labels"][row]
        assert bool((labels[n:] == -100).all())  # padding (id == EOT here) is never supervised
        assert int(labels[n - 1]) == EOT == int(batch["input_ids"][row, n - 1])
        if n < labels.numel():
            assert int(batch["input_ids"][row, n]) == EOT  # the pad id really is the EOT id


def test_c_fresh_lora_leaves_logits_bitwise_unchanged():
    model, _ = build_tiny_model("qwen2")
    ids = torch.tensor([[5, 17, 99, 200, 3, 258]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        peft = get_peft_model(model, lora_config(get_recipe("mou"), 4)).eval()
        after = peft(input_ids=ids).logits
    assert torch.equal(before, after)


def test_d_mode_string_places_two_modules_and_one_step_touches_only_them(tmp_path):
    """Also: the trained adapter saves, reloads and attaches to a fresh copy of the base with the same logits."""
    model, tok = build_tiny_model("llama")
    frozen = {name: p.detach().clone() for name, p in model.named_parameters()}
    recipe = get_recipe("lora_up_proj_only_from1_to2_r1", max_steps=1, learning_rate=1e-2,
                        per_device_train_batch_size=4)
    result = train_refusal_patch(model, tok, refusal_data(tok), recipe, tmp_path)
    patch = patch_from_peft(result.model)
    assert patch.modules == ["model.layers.1.mlp.up_proj", "model.layers.2.mlp.up_proj"]
    assert all(float(patch.delta(m).norm()) > 0 for m in patch.modules)
    for name, p in result.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name.replace(".base_layer", "")]), name
    assert result.steps == 1 and len(result.loss_history) == 1
    manifest = PatchManifest(method="refusal_sft", training=result.to_dict())
    saved = save_patch(result.model, tmp_path / "patch", manifest)
    fresh, _ = build_tiny_model("llama")
    attached = attach_patch(fresh, saved).model
    ids = probe_input_ids(fresh)
    torch.testing.assert_close(probe_logits(attached, ids), probe_logits(result.model, ids), rtol=0, atol=1e-5)


def test_bf16_trains_under_autocast_on_a_cpu_and_returns_an_fp32_model(tmp_path):
    """precision=bf16 must change the arithmetic (the loss's fast path runs outside the model's forward), keep the
    LoRA weights fp32, and hand back a model without accelerate's autocast wrapper (its logits are fp32's)."""
    runs = {}
    for precision in ("fp32", "bf16"):
        model, tok = build_tiny_model("llama")
        recipe = get_recipe("mou", max_steps=2, learning_rate=1e-2, per_device_train_batch_size=4, lora_dropout=0.0,
                            precision=precision)
        runs[precision] = train_refusal_patch(model, tok, refusal_data(tok), recipe, tmp_path / precision)
    fp32, bf16 = (torch.tensor([loss for _, loss in runs[p].loss_history]) for p in ("fp32", "bf16"))
    assert runs["bf16"].launch.precision == "bf16" and not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.0)  # rounding, not a different objective
    trained = runs["bf16"].model
    assert {p.dtype for n, p in trained.named_parameters() if "lora_" in n} == {torch.float32}
    saved = save_patch(trained, tmp_path / "patch", PatchManifest(method="refusal_sft"))
    fresh, _ = build_tiny_model("llama")
    ids = probe_input_ids(fresh)
    torch.testing.assert_close(probe_logits(attach_patch(fresh, saved).model, ids), probe_logits(trained, ids),
                               rtol=0, atol=1e-5)


def test_e_gradient_of_prompt_and_pad_logits_is_zero(tmp_path):
    model, tok = build_tiny_model("llama")
    trainer = make_trainer(model, tok, refusal_data(tok), get_recipe("mou", per_device_train_batch_size=4), tmp_path)
    batch = first_batch(trainer)
    peft = trainer.model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    logits = peft(**inputs).logits
    logits.retain_grad()
    labels = batch["labels"]
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    reference.backward()
    grad_norm = logits.grad.norm(dim=-1)[:, :-1]
    supervised = labels[:, 1:] != -100
    assert bool((grad_norm[~supervised] == 0).all())
    assert bool((grad_norm[supervised] > 0).all())
    first_completion = int((labels[0] != -100).nonzero()[0])
    assert bool(supervised[0, first_completion - 1])  # the last prompt position predicts the first completion token
    ref_grads = {n: p.grad.clone() for n, p in peft.named_parameters() if p.grad is not None}
    peft.zero_grad()
    loss, count = completion_loss(peft, dict(inputs), labels)  # the supervised-only path
    loss.backward()
    assert count == int(supervised.sum())
    assert float(loss) == pytest.approx(float(reference), rel=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(peft.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_supervised_logits_equal_the_models_own_with_softcapping(arch):
    model, _ = build_tiny_model(arch)
    if arch == "gemma3":
        model.config.final_logit_softcapping = 2.0
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[0, 4:] = mask[1, 7:] = True
    with torch.no_grad():
        full = model(**inputs).logits[:, :-1][mask]
        fast = supervised_logits(model, inputs, mask)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    if arch == "gemma3":
        assert float(full.abs().max()) <= 2.0
    model.config.logit_scale = 0.5
    assert not fast_path_supported(model)  # an unknown logit transform takes the model's own forward


def padded_batch(tok, pairs):
    """Tokenised pairs, right-padded into one batch: (examples, inputs, labels)."""
    data = tokenize_examples(tok, pairs, max_length=64)
    width = max(len(ex.input_ids) for ex in data)
    ids = torch.tensor([list(ex.input_ids) + [PAD] * (width - len(ex.input_ids)) for ex in data])
    labels = torch.tensor([ex.labels + [-100] * (width - len(ex.input_ids)) for ex in data])
    return data, {"input_ids": ids, "attention_mask": (labels != -100) | (ids != PAD)}, labels


def test_loss_weights_scale_each_examples_tokens():
    model, tok = build_tiny_model("llama")
    pairs = [SFTExample("a", "No.", "refusal"), SFTExample("b", "Sure.", "retain")]
    data, inputs, labels = padded_batch(tok, pairs)
    with torch.no_grad():
        both, n = completion_loss(model, dict(inputs), labels, torch.tensor([1.0, 1.0]))
        first, _ = completion_loss(model, dict(inputs), labels, torch.tensor([1.0, 0.0]))
        second, _ = completion_loss(model, dict(inputs), labels, torch.tensor([0.0, 1.0]))
        doubled, _ = completion_loss(model, dict(inputs), labels, torch.tensor([1.0, 2.0]))
    assert float(first + second) == pytest.approx(float(both), rel=1e-6)
    assert float(first + 2 * second) == pytest.approx(float(doubled), rel=1e-6)
    assert n == sum(sum(ex.completion_mask) for ex in data)


def test_lead_tokens_weigh_only_the_first_supervised_tokens_of_each_example():
    model, tok = build_tiny_model("llama")
    pairs = [SFTExample("a", "No, not that one.", "refusal"), SFTExample("b", "Sure, here it is.", "retain")]
    _, inputs, labels = padded_batch(tok, pairs)
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")  # 0 where -100
        mask = labels[:, 1:] != -100
        order = mask.cumsum(dim=1)
        factor = torch.where(mask & (order <= 3), 5.0, 1.0)
        expected = float((nll * factor).sum() / mask.sum())
        weighted, _ = completion_loss(model, dict(inputs), labels, lead_tokens=3, lead_weight=5.0)
        plain, _ = completion_loss(model, dict(inputs), labels)
        off, _ = completion_loss(model, dict(inputs), labels, lead_tokens=0, lead_weight=5.0)
    assert float(weighted) == pytest.approx(expected, rel=1e-5)
    assert float(weighted) > float(plain) and torch.equal(off, plain)


def test_retain_unlikelihood_adds_minus_log_one_minus_p_opening_at_flagged_first_positions():
    model, tok = build_tiny_model("llama")
    pairs = [SFTExample("a", "No, not that one.", "refusal"), SFTExample("b", "Sure, here it is.", "retain"),
             SFTExample("c", "Here you go.", "retain")]
    data, inputs, labels = padded_batch(tok, pairs)
    openings = (data[0].first_completion_id, data[1].first_completion_id)  # "N", "S"
    flags = torch.tensor([False, True, True])
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
        plain, _ = completion_loss(model, dict(inputs), labels)
        penalised, n = completion_loss(model, dict(inputs), labels, unlikely=flags, openings=openings,
                                       unlikelihood_weight=2.0)
        off, _ = completion_loss(model, dict(inputs), labels, unlikely=flags, openings=openings)
    expected = 0.0
    for row in (1, 2):
        first = int((labels[row, 1:] != -100).nonzero()[0])
        p_open = logits[row, first].softmax(-1)[list(openings)].sum()
        expected += -2.0 * float(torch.log1p(-p_open))
    assert float(penalised) == pytest.approx(float(plain) + expected / n, rel=1e-5)
    assert torch.equal(off, plain)


def test_retain_unlikelihood_lowers_the_refusal_opening_on_retain_prompts(tmp_path):
    """Trained with the term, the tiny model gives the refusal openings less mass at the retain examples' first
    completion position than trained without it, from the same seed, the more the heavier the term; the manifest
    records the openings."""
    pairs = [*build_refusal_examples([Example(prompt=p, category=c) for p, c in zip(PROMPTS, CATEGORIES,
                                                                                    strict=True)]),
             SFTExample("what is 2 + 2", "The answer is 4.", "retain"),
             SFTExample("name a colour", "Blue is a colour.", "retain"),
             SFTExample("kill a python process", "Use kill -9 with its pid.", "retain"),
             SFTExample("say hello", "I'm glad to: hello!", "retain")]
    mass = {}
    for weight in (0.0, 5.0, 20.0):
        model, tok = build_tiny_model("llama")
        data = tokenize_examples(tok, pairs, max_length=256)
        recipe = get_recipe("mou", mode="full", max_steps=30, learning_rate=3e-3, lr_scheduler_type="constant",
                            weight_decay=0.0, precision="fp32", per_device_train_batch_size=8,
                            retain_unlikelihood=weight)
        result = train_refusal_patch(model, tok, data, recipe, tmp_path / str(weight))
        openings = sorted({ex.first_completion_id for ex in data if ex.kind == "refusal"})
        assert result.refusal_openings == (tuple(openings) if weight else ())
        assert result.unlikelihood_examples == (3 if weight else 0)  # "I'm glad" opens like a refusal: skipped
        assert result.to_dict()["refusal_openings"] == list(result.refusal_openings)
        retain = [ex for ex in data if ex.kind == "retain"][:3]
        total = 0.0
        for ex in retain:
            n_prompt = len(ex.input_ids) - sum(ex.completion_mask)
            with torch.no_grad():
                logits = result.model(input_ids=torch.tensor([ex.input_ids[:n_prompt]])).logits[0, -1]
            total += float(logits.softmax(-1)[openings].sum())
        mass[weight] = total / len(retain)
    assert mass[20.0] < mass[5.0] < mass[0.0] and mass[20.0] < 0.5 * mass[0.0]


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    """batch 4 × accumulation 1 and batch 2 × accumulation 2 make the same optimiser step (TRL invariant style)."""
    deltas = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model, tok = build_tiny_model("llama")
        recipe = get_recipe("lora_mlp_r2", max_steps=1, learning_rate=1e-2, lora_dropout=0.0,
                            per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                            regularizer=RegularizerConfig(k=8, beta=0.5), precision="fp32")  # bf16 rounds per shape
        result = train_refusal_patch(model, tok, refusal_data(tok), recipe, tmp_path / f"{batch}")
        patch = patch_from_peft(result.model)
        deltas.append({m: patch.delta(m) for m in patch.modules})
    for module, delta in deltas[0].items():
        torch.testing.assert_close(deltas[1][module], delta, rtol=1e-3, atol=1e-6)


def test_regulariser_and_progress_are_reported(tmp_path):
    model, tok = build_tiny_model("llama")
    seen = []
    recipe = get_recipe("lora_mlp_orthogonal_norm_r2_beta1.0_k8", max_steps=2, learning_rate=1e-2,
                        per_device_train_batch_size=2)
    result = train_refusal_patch(model, tok, refusal_data(tok), recipe, tmp_path, progress=seen.append)
    assert [p.step for p in seen] == [1, 2] and seen[-1].max_steps == 2
    assert len(result.regularizer) == 12 and all(0 < v <= 1 for v in result.regularizer.values())
    assert result.tokens_per_second > 0 and 0 < result.supervised_fraction < 1
    manifest_block = result.to_dict()
    assert "model" not in manifest_block and manifest_block["steps"] == 2


def test_full_mode_trains_every_parameter(tmp_path):
    model, tok = build_tiny_model("llama")
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    recipe = get_recipe("mou", mode="full", max_steps=1, learning_rate=1e-3, per_device_train_batch_size=4)
    result = train_refusal_patch(model, tok, refusal_data(tok), recipe, tmp_path)
    assert result.model is model
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_f_overfit_four_refusals_and_stop_at_eot(tmp_path):
    """Full mode: on a randomly initialised tiny model LoRA needs ~200 steps to reach the same greedy outputs with
    flat probabilities (loss ~4.5), while full fine-tuning memorises them firmly (loss ~0.01) in 100 steps."""
    model, tok = build_tiny_model("llama")
    data = refusal_data(tok)
    recipe = get_recipe("mou", mode="full", learning_rate=3e-3, lr_scheduler_type="constant", weight_decay=0.0,
                        max_steps=100, per_device_train_batch_size=4, precision="fp32")
    result = train_refusal_patch(model, tok, data, recipe, tmp_path)
    assert result.loss_history[-1][1] < 0.1
    peft = result.model
    for ex in data:
        n_prompt = len(ex.input_ids) - sum(ex.completion_mask)
        prompt = torch.tensor([ex.input_ids[:n_prompt]])
        with torch.no_grad():
            out = peft.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=sum(ex.completion_mask) + 5, eos_token_id=EOT, pad_token_id=PAD)
        assert out[0, n_prompt:].tolist() == list(ex.input_ids[n_prompt:])  # the refusal, ending with the EOT


def test_distilled_examples_take_kl_from_the_teacher_instead_of_cross_entropy():
    """At every supervised position of a flagged example the loss is KL(teacher ‖ model) over the vocabulary; other
    examples keep their cross-entropy; a teacher equal to the model gives zero there."""
    model, tok = build_tiny_model("llama")
    pairs = [SFTExample("a", "No, not that one.", "refusal"), SFTExample("b", "Sure, here it is.", "retain"),
             SFTExample("c", "Here you go.", "retain")]
    _, inputs, labels = padded_batch(tok, pairs)
    flags = torch.tensor([False, True, False])
    mask = labels[:, 1:] != -100
    with torch.no_grad():
        logits = model(**inputs).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="none")
        teacher = torch.randn(int(mask[1].sum()), logits.shape[-1]) * 3
        log_t, log_s = teacher.log_softmax(-1), logits[1][mask[1]].log_softmax(-1)
        kl = float((log_t.exp() * (log_t - log_s)).sum())
        expected = (float(nll[0].sum() + nll[2].sum()) + kl) / int(mask.sum())
        distilled, n = completion_loss(model, dict(inputs), labels, distill=flags, teacher_logits=teacher)
        itself, _ = completion_loss(model, dict(inputs), labels, distill=flags, teacher_logits=logits[1][mask[1]])
        with pytest.raises(ValueError, match="teacher_logits"):
            completion_loss(model, dict(inputs), labels, distill=flags)
    assert n == int(mask.sum()) and float(distilled) == pytest.approx(expected, rel=1e-5)
    assert float(itself) == pytest.approx(float(nll[0].sum() + nll[2].sum()) / n, rel=1e-5, abs=1e-6)


def test_retain_kl_distils_from_the_model_with_its_adapter_off(tmp_path):
    """The trainer's teacher is the unpatched model (the LoRA adapter switched off), at the supervised positions of
    the retain rows only, and its loss is completion_loss with that teacher."""
    pairs = [*build_refusal_examples([Example(prompt=p, category=c) for p, c in zip(PROMPTS, CATEGORIES,
                                                                                    strict=True)]),
             SFTExample("what is 2 + 2", "The answer is 4.", "retain"),
             SFTExample("name a colour", "Blue is a colour.", "retain")]
    model, tok = build_tiny_model("llama")
    base, _ = build_tiny_model("llama")
    data = tokenize_examples(tok, pairs, max_length=256)
    recipe = get_recipe("mou", precision="fp32", per_device_train_batch_size=8, retain_unlikelihood=0.0,
                        retain_loss="kl")
    trainer = make_trainer(model, tok, data, recipe, tmp_path)
    assert trainer.train_dataset["distill"] == [False] * 4 + [True] * 2
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # a patch that changes the logits
    batch = first_batch(trainer)
    labels, distill = batch["labels"], batch["distill"].to(torch.bool)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    mask = labels[distill][:, 1:] != -100
    with torch.no_grad():
        teacher = trainer._teacher_logits(trainer.model, inputs, labels, batch["distill"])
        expected = base(**{k: v[distill] for k, v in inputs.items()}).logits[:, :-1][mask]
        patched = trainer.model(**{k: v[distill] for k, v in inputs.items()}).logits[:, :-1][mask]
        assert torch.allclose(teacher, expected, atol=1e-5) and not torch.allclose(teacher, patched, atol=1e-2)
        loss = trainer.compute_loss(trainer.model, dict(batch))
        manual, _ = completion_loss(trainer.model, inputs, labels, batch["loss_weight"], distill=batch["distill"],
                                    teacher_logits=expected, lead_tokens=4, lead_weight=3.0)
    assert float(loss) == pytest.approx(float(manual), rel=1e-4)


def test_retain_kl_alone_leaves_the_model_where_it_was(tmp_path):
    """Retain examples only, distilled from the unpatched model: the loss starts at exactly zero and stays near it,
    and the adapter's ΔW moves less than under cross-entropy on the same answers (Adam turns rounding-level gradients
    into steps of a fraction of the learning rate, so not to zero)."""
    pairs = [SFTExample("what is 2 + 2", "The answer is 4.", "retain"), SFTExample("name a colour", "Blue.", "retain")]
    moved = {}
    for loss in ("ce", "kl"):
        model, tok = build_tiny_model("llama")
        recipe = get_recipe("mou", max_steps=5, learning_rate=1e-2, precision="fp32", per_device_train_batch_size=2,
                            retain_loss=loss, retain_unlikelihood=0.0)
        result = train_refusal_patch(model, tok, tokenize_examples(tok, pairs, max_length=64), recipe, tmp_path / loss)
        assert result.distilled_examples == (2 if loss == "kl" else 0)
        factors = dict(result.model.named_parameters())
        moved[loss] = max(float((factors[name] @ factors[name.replace("lora_B", "lora_A")]).abs().max())
                          for name in factors if "lora_B" in name)
        if loss == "kl":
            assert result.loss_history[0][1] == 0.0 and all(value < 0.05 for _, value in result.loss_history)
    assert moved["kl"] < 0.5 * moved["ce"]


def test_retain_kl_needs_a_lora_adapter():
    with pytest.raises(ConfigError, match=r"retain_loss='kl'.*adapter"):
        get_recipe("mou", mode="full", retain_loss="kl")
