"""`lmlab average --run RUN_DIR --last N --out DIR`: the mean of a run's last N step checkpoints
(one per epoch in a fine-tuning run trained with `keep_last: 0`), written as a model directory
like the run's own — config.json, model.safetensors, the tokenizer, and the run's
train_config.yaml and translation.json — so that every command that takes the run takes it.
OUT/averaged.json names the steps that went into it. lmlab/training/averaging.py says why."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lmlab.errors import ConfigError
from lmlab.models import from_pretrained
from lmlab.recipes.run_steps import CONFIG_FILE
from lmlab.recipes.translation import META_FILE
from lmlab.tokenizer import Tokenizer
from lmlab.training import checkpoint as ckpt_io
from lmlab.training.averaging import average_weights, last_checkpoints

# Files beside a run's weights that commands read with the model: the run's config (the recipe
# and data settings `lmlab evaluate` / `predict` take) and a translation model's languages.
SIDECARS = (CONFIG_FILE, META_FILE)


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True, type=Path,
                        help="a finished training run's directory (its checkpoints/step-*)")
    parser.add_argument("--last", required=True, type=int, metavar="N",
                        help="how many of the newest step checkpoints to average")
    parser.add_argument("--out", required=True, type=Path, help="where to write the model")


def average(run: Path, last: int, out: Path) -> list[int]:
    """Write the mean of RUN's last `last` checkpoints to OUT; return their steps. OUT appears
    complete or not at all (written beside it under a temporary name, then renamed)."""
    run, out = Path(run), Path(out)
    if not (run / "config.json").is_file():
        raise ConfigError(f"--run {run}: no config.json; expected a finished run's directory "
                          "(it holds the model and its checkpoints/)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not empty; choose another directory")
    checkpoints = last_checkpoints(run, last)
    model = from_pretrained(run)
    weights = average_weights(checkpoints)
    ckpt_io.check_weights(checkpoints[-1], weights, model)
    model.load_state_dict(weights, strict=False)  # tied names aside, checked complete above
    steps = [c.step for c in checkpoints]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = Tokenizer.from_pretrained(run) if (run / "tokenizer.json").is_file() else None
        model.save_pretrained(tmp, tokenizer=tokenizer)
        for name in SIDECARS:
            if (run / name).is_file():
                shutil.copyfile(run / name, tmp / name)
        record = {"averaged_steps": steps,
                  "checkpoints": [f"checkpoints/{c.path.name}" for c in checkpoints]}
        (tmp / "averaged.json").write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return steps


def run(args) -> int:
    steps = average(args.run, args.last, args.out)
    print(f"averaged {len(steps)} checkpoints of {args.run} (steps {', '.join(map(str, steps))}) "
          f"into {args.out}")
    return 0
