"""lmlab: pretrain, fine-tune, decode and serve transformer language models.

The curated public API:

    import lmlab
    model = lmlab.from_pretrained(path)          # a Hugging Face GPT-2 or BERT directory, or an lmlab run
    tok = lmlab.Tokenizer.from_pretrained(path)
    out = lmlab.generate(model, input_ids, max_new_tokens=32)
    engine = lmlab.Engine(model, max_rows=16)       # rows that join and leave: see Engine
    model.save_pretrained(path2)
    run = lmlab.finetune_classification(lmlab.FinetuneClassificationConfig(...), run_dir=d)
    lmlab.evaluate(d, data=file); lmlab.predict(d, data=file, out=file2)
"""

from lmlab.errors import CheckpointError, ConfigError, DataError, LmlabError
from lmlab.generation import Engine, GenerationConfig, generate, generate_tokens, stream
from lmlab.models import BertConfig, BertModel, GPT, GPTConfig, from_pretrained
from lmlab.tokenizer import Tokenizer
from lmlab.recipes.classification import FinetuneClassificationConfig, finetune_classification
from lmlab.recipes.finetuning import evaluate, predict
from lmlab.recipes.qa import FinetuneQAConfig, finetune_qa

__version__ = "0.1.0"

__all__ = [
    "BertConfig", "BertModel", "Engine", "GPT", "GPTConfig", "GenerationConfig", "Tokenizer",
    "from_pretrained", "generate", "generate_tokens", "stream", "LmlabError", "ConfigError",
    "DataError", "CheckpointError",
    "FinetuneClassificationConfig", "FinetuneQAConfig", "finetune_classification", "finetune_qa",
    "evaluate", "predict",
]
