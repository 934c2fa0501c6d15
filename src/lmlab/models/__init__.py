from lmlab.models.bert import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertModel,
)
from lmlab.models.gpt import GPT, GPTConfig, GPTForSequenceClassification
from lmlab.models.hf import from_pretrained

__all__ = [
    "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM",
    "BertForSequenceClassification", "BertForQuestionAnswering",
    "GPT", "GPTConfig", "GPTForSequenceClassification", "from_pretrained"]
