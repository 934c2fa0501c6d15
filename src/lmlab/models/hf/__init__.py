"""Hugging Face interop: one record per model family (gpt2.py, bert.py), the record types and
their registry (records.py), and reading and writing checkpoints through them (checkpoints.py).

Adding a family: a module here with its config tables, key maps and one `register_family(...)`,
imported below — nothing else changes.
"""

from lmlab.models import base
from lmlab.models.hf import bert, checkpoints, gpt2, t5
from lmlab.models.hf.checkpoints import (from_pretrained, load, load_encoder, load_weights,
                                         read_config, read_state_dict, save_pretrained,
                                         save_weights, state_to_hf, to_hf)
from lmlab.models.hf.gpt2 import gpt2_state_dict_from_hf
from lmlab.models.hf.records import (RECORDS, FamilyRecord, KeyMap, config_values, labels_from_hf,
                                     labels_to_hf, record_for, register_family)

# The model classes save and load through these functions without importing them (this package
# imports the model files: the reverse arrow would be a circle).
base.register_checkpoint_io(checkpoints)

__all__ = ["RECORDS", "FamilyRecord", "KeyMap", "config_values", "from_pretrained",
           "gpt2_state_dict_from_hf", "labels_from_hf", "labels_to_hf", "load", "load_encoder",
           "load_weights", "read_config", "read_state_dict", "record_for", "register_family",
           "save_pretrained", "save_weights", "state_to_hf", "to_hf", "bert", "gpt2", "t5"]
