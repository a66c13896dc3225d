"""Tiny models of tests/tiny.py as GGUF files, written the way llama.cpp's convert_hf_to_gguf.py writes them: gguf's
tensor names, llama's q/k rows permuted (written out here, apart from the code under test), gemma3's norms + 1, the
byte-level tokenizer and ChatML template in the metadata. transformers reads them back (llama and qwen2 exactly)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from tests.tiny import CHATML, SPECIAL_TOKENS

GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "gemma3": gguf.MODEL_ARCH.GEMMA3}


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def hf_to_file(arch: str, config, hf_name: str, weights: np.ndarray) -> np.ndarray:
    """An HF weight in the GGUF file's layout (PyTorch shape): llama's q/k rows permuted, gemma3's norms + 1."""
    if arch == "llama" and hf_name.endswith("q_proj.weight"):
        return llama_permute(weights, config.num_attention_heads, config.num_attention_heads)
    if arch == "llama" and hf_name.endswith("k_proj.weight"):
        return llama_permute(weights, config.num_attention_heads, config.num_key_value_heads)
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        return weights + 1
    return weights


def write_tiny_gguf(model, tokenizer, path: Path, qtype: str = "F32", name: str = "tiny") -> Path:
    """Write the tiny HF ``model`` (tests/tiny.py) as a GGUF model file; 2-D weights at ``qtype``, norms F32."""
    arch = model.config.model_type.removesuffix("_text")
    config = model.config
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = config.rope_parameters
    writer.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if arch == "gemma3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)
    writer.add_file_type(int(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType[f"MOSTLY_{qtype}"]))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(config.vocab_size)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 5 if t.startswith("[PAD") else 1 for t in tokens])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], config.num_hidden_layers)
    quant = gguf.GGMLQuantizationType[qtype]
    for hf_name, tensor in model.state_dict().items():
        file_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if file_name is None or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
            continue  # a tied output layer is token_embd.weight, as convert_hf_to_gguf.py writes it
        data = hf_to_file(arch, config, hf_name, tensor.detach().float().numpy())
        if data.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(file_name, gguf.quants.quantize(data, quant), raw_dtype=quant)
        else:
            writer.add_tensor(file_name, np.ascontiguousarray(data, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
