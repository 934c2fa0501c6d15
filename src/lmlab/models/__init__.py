from lmlab.models.gpt import GPT, GPTConfig
from lmlab.models.hf import from_pretrained

__all__ = ["GPT", "GPTConfig", "from_pretrained"]
