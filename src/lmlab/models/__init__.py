from lmlab.models.gpt import GPT, GPTConfig, GPTForSequenceClassification
from lmlab.models.hf import from_pretrained

__all__ = ["GPT", "GPTConfig", "GPTForSequenceClassification", "from_pretrained"]
