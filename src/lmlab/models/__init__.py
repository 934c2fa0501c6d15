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
from lmlab.models.t5 import T5Config, T5ForConditionalGeneration

__all__ = [
    "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM",
    "BertForSequenceClassification", "BertForQuestionAnswering",
    "GPT", "GPTConfig", "GPTForSequenceClassification", "T5Config", "T5ForConditionalGeneration",
    "from_pretrained"]
