"""Language models sharing one interface (see ``fdiv_jax.lm.models.base``).

``GPT2LM`` (GPT-2 architecture with a KV cache), ``DecoderLM`` (Llama,
Mistral, Qwen2 and Qwen3 architectures with a KV cache), ``LSTMLM``;
``load_hf_checkpoint`` / ``save_hf_checkpoint`` (local Hugging Face
checkpoints of those families, no PyTorch), ``LoRALM`` / ``LoRAConfig``
(low-rank adapters on a frozen GPT-2 or decoder, ``lora``), ``ModelSpec``
(which base model a run starts from, loaded on demand).
"""

from fdiv_jax.lm.models.base import LanguageModel
from fdiv_jax.lm.models.decoder import DecoderConfig
from fdiv_jax.lm.models.decoder import DecoderLM
from fdiv_jax.lm.models.gpt2 import GPT2Config
from fdiv_jax.lm.models.gpt2 import GPT2LM
from fdiv_jax.lm.models.hf_export import save_hf_checkpoint
from fdiv_jax.lm.models.hf_import import config_from_hf
from fdiv_jax.lm.models.hf_import import load_hf_checkpoint
from fdiv_jax.lm.models.hf_import import SUPPORTED_MODEL_TYPES
from fdiv_jax.lm.models import lora
from fdiv_jax.lm.models.lora import LoRAConfig
from fdiv_jax.lm.models.lora import LoRALM
from fdiv_jax.lm.models.lstm import LSTMConfig
from fdiv_jax.lm.models.lstm import LSTMLM
from fdiv_jax.lm.models.spec import ModelSpec

__all__ = [
    "DecoderConfig", "DecoderLM", "GPT2Config", "GPT2LM", "LSTMConfig",
    "LSTMLM", "LanguageModel", "LoRAConfig", "LoRALM", "ModelSpec",
    "SUPPORTED_MODEL_TYPES", "lora",
    "config_from_hf", "load_hf_checkpoint", "save_hf_checkpoint",
]
