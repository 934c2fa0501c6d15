"""lmlab: pretrain, fine-tune, decode and serve transformer language models."""
