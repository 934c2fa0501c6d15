"""Shared fixtures: tiny random GPT-2 checkpoints, built locally with transformers (never the hub);
tiny pretrained lmlab models and data; a live server for the serving tests. (One conftest for
all: tests import helpers from it as `conftest`, so a second conftest.py would shadow it.)"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# (n_layer, n_head, n_embd, n_positions, vocab) shapes, one activation each; "c" has an explicit
# n_inner that is not 4 * n_embd, "b" an untied output head.
TINY_GPT2 = {
    "a": dict(n_layer=1, n_head=1, n_embd=8, n_positions=16, vocab_size=50,
              activation_function="gelu_new"),
    "b": dict(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=100,
              activation_function="gelu", tie_word_embeddings=False),
    "c": dict(n_layer=3, n_head=2, n_embd=24, n_positions=40, vocab_size=77, n_inner=40,
              activation_function="relu"),
}


def build_hf_gpt2(*, seed: int = 0, **config):
    """A seeded `transformers.GPT2LMHeadModel` in eval mode, with every parameter randomised."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(bos_token_id=None, eos_token_id=None, **config)).eval()
    # HF's init leaves LayerNorms at 1/0 and every bias at 0, which would hide a swapped or
    # dropped LayerNorm or bias; larger weights also make greedy argmax gaps far above fp noise.
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied lm_head is not listed twice
            if ".ln_" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """`tiny_gpt2(name) -> (hf_model, checkpoint_dir)`, built once per session per name."""
    built = {}

    def get(name: str):
        if name not in built:
            hf = build_hf_gpt2(**TINY_GPT2[name])
            directory = tmp_path_factory.mktemp(f"gpt2_{name}")
            hf.save_pretrained(directory)
            built[name] = (hf, directory)
        return built[name]

    return get


# Tiny T5 shapes: v1.0 (ReLU, tied and rescaled head) and v1.1 (gated GELU, untied head), with
# few buckets and a short max distance so that the log-spaced buckets are exercised.
TINY_T5 = {
    "v1_0": dict(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20),
    "v1_1": dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                 relative_attention_num_buckets=8, relative_attention_max_distance=20,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


def build_hf_t5(directory, *, name: str, seed: int = 0):
    """A seeded `transformers.T5ForConditionalGeneration` (eval mode) with every weight
    randomised — RMS norms off 1, an untied head of its own for v1.1 — saved to `directory`
    in the layout transformers writes (a v1.1 head goes in as its own tensor: transformers 5
    builds every T5 tied and unties only what the checkpoint holds apart). Returns the model
    transformers loads back from there."""
    import safetensors.torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = dict(TINY_T5[name], decoder_start_token_id=0)
    model = T5ForConditionalGeneration(T5Config(**config)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "layer_norm" in pname:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif pname != "shared.weight":
                p.mul_(3.0)  # wider logits: greedy choices far above fp noise
    model.save_pretrained(directory)
    if not config.get("tie_word_embeddings", True):
        state = safetensors.torch.load_file(directory / "model.safetensors")
        state["lm_head.weight"] = torch.randn(config["vocab_size"], config["d_model"])
        safetensors.torch.save_file(state, directory / "model.safetensors",
                                    metadata={"format": "pt"})
        config_file = directory / "config.json"
        config_file.write_text(config_file.read_text().replace(
            '"tie_word_embeddings": true', '"tie_word_embeddings": false'))
    return T5ForConditionalGeneration.from_pretrained(directory).eval()


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    """`tiny_t5(name) -> (hf_model, checkpoint_dir)` for name in TINY_T5, built once."""
    built = {}

    def get(name: str):
        if name not in built:
            directory = tmp_path_factory.mktemp(f"t5_{name}")
            built[name] = (build_hf_t5(directory, name=name), directory)
        return built[name]

    return get


# -- small corpora for the pretraining objectives: learnable by a tiny model in a few steps --
SUBJECTS = ["the cat", "a dog", "my friend", "the old farmer", "every child", "the teacher"]
VERBS = ["sees", "likes", "paints", "follows", "remembers", "carries"]
OBJECTS = ["the river", "a red apple", "the quiet village", "seven stones", "the morning sun"]
WORDS = ["river", "stone", "village", "morning", "farmer", "apple", "teacher", "quietly", "red"]


def simple_sentence(rng) -> str:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."


def write_simple_documents(path: Path, *, n: int = 80, seed: int = 0) -> Path:
    """A JSONL of `n` documents of 4-11 simple sentences each."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            text = " ".join(simple_sentence(rng) for _ in range(int(rng.integers(4, 12))))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_word_documents(path: Path, *, n: int = 40, seed: int = 0) -> list[str]:
    """A JSONL of `n` documents of 10-39 random WORDS; returns their texts."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, int(rng.integers(10, 40)))) + "." for _ in range(n)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


def fit_task(task, model, *, steps: int, lr: float = 3e-3) -> tuple[dict, dict]:
    """The task's evaluation before and after `steps` AdamW steps on its own batches (each
    micro-batch's summed loss over the step's target count, as the loop does)."""
    before = task.evaluate(model.eval())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        batches = task.train_batches(step)
        total = sum(task.num_targets(b) for b in batches)
        for b in batches:
            (task.loss(model, b) / total).backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, task.evaluate(model.eval())


@pytest.fixture
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    barrier can turn a 20 µs matmul into 8 ms; run such tests on one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- fine-tuning: tiny pretrained models and a synthetic sentiment set ---------------------------
POSITIVE = "good great fine happy nice lovely".split()
NEGATIVE = "bad awful sad poor ugly horrible".split()
FILLER = "the movie was a and it is very so plot actor film".split()


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Sentences of filler words with one sentiment word: {"sentence", "label": "neg"|"pos"}."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 10))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if positive else NEGATIVE))
        rows.append({"sentence": " ".join(words), "label": "pos" if positive else "neg"})
    return rows


def _corpus() -> list[str]:
    return [r["sentence"] for r in sentiment_rows(200, 99)] + 20 * [
        "what which who when where why how is are was were first last follows answer question",
        "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi"]


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory):
    """train.jsonl (240 rows) and validation.jsonl (80 rows) of the synthetic sentiment task."""
    return write_splits(tmp_path_factory.mktemp("sentiment"),
                        {"train": sentiment_rows(240, 0), "validation": sentiment_rows(80, 1)})


def write_splits(directory, splits: dict[str, list[dict]]):
    """DIRECTORY/<split>.jsonl for each split's rows; returns DIRECTORY."""
    import json

    for name, rows in splits.items():
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory):
    """A random 2-layer, width-32 BERT encoder with a small WordPiece vocabulary, saved as a
    pretrained checkpoint (what `lmlab finetune --model` expects)."""
    from lmlab.models.bert import BertConfig, BertModel
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.train_wordpiece(iterator=_corpus(), vocab_size=300, min_frequency=1)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=64))
    directory = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(directory, tokenizer=tok)
    return directory


@pytest.fixture(scope="session")
def tiny_gpt_dir(tmp_path_factory):
    """A random 2-layer, width-32 GPT with a byte-level BPE vocabulary of 300."""
    from lmlab.models.gpt import GPT, GPTConfig
    from lmlab.tokenizer import Tokenizer

    tok = Tokenizer.train_bpe(iterator=_corpus(), vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=32, n_layer=2,
                          n_head=2, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id))
    directory = tmp_path_factory.mktemp("tiny_gpt")
    model.save_pretrained(directory, tokenizer=tok)
    return directory


# -- serving: a server on a free loopback port, a slowed model ------------------------------------
class LiveServer:

    """uvicorn serving `app` in a thread on a free loopback port."""

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


class Slow:
    """The tiny model, `delay` seconds slower a forward pass (the decoder protocol, nothing
    more): long enough to see a row running, or a queue full."""

    def __init__(self, model, delay: float = 0.02):
        self.model, self.config, self.delay = model, model.config, delay
        self.context_window = model.context_window

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.model(*args, **kwargs)


@pytest.fixture(scope="session")
def tiny(tiny_gpt_dir):
    """(model, tokenizer) of tiny_gpt_dir, in eval mode."""
    from lmlab.models import from_pretrained
    from lmlab.tokenizer import Tokenizer

    return from_pretrained(tiny_gpt_dir).eval(), Tokenizer.from_pretrained(tiny_gpt_dir)


@pytest.fixture(scope="session")
def live_server():
    """LiveServer(app): a context manager serving `app` on a free loopback port."""
    pytest.importorskip("uvicorn")
    return LiveServer


@pytest.fixture(scope="session")
def slow_model():
    """Slow(model, delay=0.02): a model whose every forward pass takes `delay` longer."""
    return Slow


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """`lmlab ARGV` in-process: (exit status, stdout, stderr); argparse's SystemExit is unwrapped."""
    from lmlab.cli import main

    capsys.readouterr()  # drop anything a fixture printed
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


# -- translation: a synthetic word-substitution "language" pair, and a tiny run trained on it ----
TRANSLATION_WORDS = {
    "en": "ka lo mi tu be ra no si fe du pa go".split(),
    "de": "hund katze baum haus auto buch tisch stuhl lampe fenster tuer wand".split(),
    "fr": "chien chat arbre maison voiture livre table chaise bougie porte mur sol".split(),
}
# A T5 from scratch small enough to learn the substitution in seconds (lmlab finetune translation)
TINY_TRANSLATION = ["--vocab_size", "150", "--d_model", "32", "--d_kv", "8", "--d_ff", "64",
                    "--num_layers", "2", "--num_heads", "4", "--dropout_rate", "0",
                    "--max_length", "32", "--batch_size", "16", "--lr", "1e-2",
                    "--num_beams", "2", "--warmup_ratio", "0.05", "--seed", "3"]


def translation_rows(n: int, seed: int) -> list[dict]:
    """`n` sentences of 3–6 words, word i of "en" translated as word i of "de" and of "fr"."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.randrange(12) for _ in range(rng.randint(3, 6))]
        rows.append({"id": i, **{lang: " ".join(vocab[w] for w in words)
                                 for lang, vocab in TRANSLATION_WORDS.items()}})
    return rows


@pytest.fixture(scope="session")
def translation_files(tmp_path_factory):
    """DIRECTORY with train (300), validation (40) and test (20) .jsonl pairs of the synthetic
    languages."""
    return write_splits(tmp_path_factory.mktemp("translation"),
                        {"train": translation_rows(300, 0), "validation": translation_rows(40, 1),
                         "test": translation_rows(20, 2)})


@pytest.fixture(scope="session")
def tiny_translation_run(translation_files, tmp_path_factory):
    """An en → de T5 trained from scratch for 6 epochs (`lmlab finetune translation`)."""
    from lmlab.cli import main

    out = tmp_path_factory.mktemp("translation_run") / "run"
    code = main(["finetune", "translation", "--train", str(translation_files / "train.jsonl"),
                 "--validation", str(translation_files / "validation.jsonl"), "--source_lang", "en",
                 "--target_lang", "de", "--epochs", "6", "--out", str(out), "--no-progress",
                 *TINY_TRANSLATION])
    assert code == 0
    return out
