"""`lmlab finetune TASK --config FILE --out RUN_DIR [--key value …]`: the fine-tuning recipe
named TASK (lmlab.recipes, command "finetune")."""

from __future__ import annotations

from lmlab.cli import add_resume_argument, rank_zero_speaks
from lmlab.config import parse_overrides
from lmlab.errors import ConfigError
from lmlab.recipes import find_recipe, load_recipe_config, recipes_for
from lmlab.recipes.run_steps import config_text


RECIPE_CHOICE = "task"  # the argument that picks the recipe (--help lists its keys)


def add_arguments(parser) -> None:
    tasks = recipes_for("finetune")
    parser.add_argument("task", choices=sorted(tasks), help="what to fine-tune for: " +
                        "; ".join(f"{n}: {r.help}" for n, r in sorted(tasks.items())))
    parser.add_argument("--config", help="YAML preset, e.g. configs/finetune/sst2.yaml")
    parser.add_argument("--out", help="run directory (model, checkpoints, logs); required "
                        "unless --show-masks")
    add_resume_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--show-masks", type=int, metavar="N",
                        help="print the first N training examples with the trained tokens "
                             "marked ⟦…⟧, then exit (sft)")
    parser.epilog = ("Any config key can be overridden: --model DIR --train FILE --validation FILE "
                     "--test FILE --epochs 3 --lr 5e-5 … Launch with `torchrun --nproc_per_node=N "
                     "-m lmlab finetune …` for data-parallel training (DDP; batch_size is per "
                     "process).")
    parser.set_defaults(_accepts_overrides=True)


def run(args) -> int:
    recipe = find_recipe(args.task, command="finetune")
    cfg = load_recipe_config(recipe, args.config, parse_overrides(args.overrides))
    if args.show_masks is not None:
        if recipe.show_examples is None:
            raise ConfigError(f"--show-masks: recipe {recipe.name!r} has no example view")
        if args.show_masks <= 0:
            raise ConfigError(f"--show-masks must be positive, got {args.show_masks}")
        print(recipe.show_examples(cfg, args.show_masks))
        return 0
    if args.out is None:
        raise ConfigError("--out RUN_DIR is required")
    say = rank_zero_speaks()  # under torchrun; the others report errors only
    say("resolved config:\n" + config_text(recipe.name, cfg))
    out = recipe.run(cfg, run_dir=args.out, resume=args.resume, progress=not args.no_progress)
    r = out.train
    say(f"{r.steps} steps{' (stopped early)' if r.stopped_early else ''}, "
        f"{r.train_seconds:.1f} s training, {out.wall_seconds:.1f} s in all")
    say(f"best validation (step {r.best_step}): {format_metrics(out.validation)}")
    if out.test:
        say(f"test: {format_metrics(out.test)}")
    say(f"model: {out.run_dir} (lmlab.from_pretrained('{out.run_dir}'))")
    if out.predictions:
        say(f"predictions: {out.predictions}")
    return 0


def format_metrics(metrics: dict[str, float]) -> str:
    """accuracy-like figures in [0, 1] as percentages; SQuAD's are already percentages."""
    parts = []
    for key, value in metrics.items():
        name = key.removeprefix("val_")
        if name in ("accuracy", "macro_f1", "in_scope_accuracy", "exclude_recall"):
            parts.append(f"{name} {100 * value:.2f}%")
        elif name in ("exact_match", "f1"):
            parts.append(f"{name} {value:.2f}")
        else:
            parts.append(f"{name} {value:.4f}")
    return ", ".join(parts)
