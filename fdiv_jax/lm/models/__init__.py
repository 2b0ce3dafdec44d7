"""Language models sharing one interface (see ``fdiv_jax.lm.models.base``).

``GPT2LM`` (GPT-2 architecture with a KV cache), ``LSTMLM`` and
``load_hf_checkpoint`` (local Hugging Face GPT-2 checkpoints, no PyTorch),
``ModelSpec`` (which base model a run starts from, loaded on demand).
"""

from fdiv_jax.lm.models.base import LanguageModel
from fdiv_jax.lm.models.gpt2 import GPT2Config
from fdiv_jax.lm.models.gpt2 import GPT2LM
from fdiv_jax.lm.models.hf_import import config_from_hf
from fdiv_jax.lm.models.hf_import import load_hf_checkpoint
from fdiv_jax.lm.models.lstm import LSTMConfig
from fdiv_jax.lm.models.lstm import LSTMLM
from fdiv_jax.lm.models.spec import ModelSpec

__all__ = [
    "GPT2Config", "GPT2LM", "LSTMConfig", "LSTMLM", "LanguageModel",
    "ModelSpec", "config_from_hf", "load_hf_checkpoint",
]
