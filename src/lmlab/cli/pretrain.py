"""`lmlab pretrain --config FILE --out RUN_DIR [--objective NAME] [--key value …]`: the pretraining
recipe the objective names (lmlab.recipes, command "pretrain")."""

from __future__ import annotations

from lmlab.cli import add_resume_argument, rank_zero_speaks
from lmlab.config import parse_overrides
from lmlab.recipes import recipes_for
from lmlab.recipes.pretraining import pretrain_recipe
from lmlab.recipes.run_steps import config_text


RECIPE_CHOICE = "objective"  # the argument that picks the recipe (--help lists its keys)


def add_arguments(parser) -> None:
    objectives = recipes_for("pretrain")
    parser.add_argument("--config", help="YAML preset, e.g. configs/pretrain/shakespeare_char.yaml")
    parser.add_argument("--objective", choices=sorted(objectives), default=None,
                        help="the recipe (default: the config's objective, else causal): " +
                             "; ".join(f"{n}: {r.help}" for n, r in sorted(objectives.items())))
    parser.add_argument("--out", required=True, help="run directory (model, checkpoints, logs)")
    add_resume_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.epilog = ("Any config key can be overridden: --data PATH --max_steps 100 --lr 3e-4 … "
                     "Launch with `torchrun --nproc_per_node=N -m lmlab pretrain …` for "
                     "data-parallel training (--parallel ddp|fsdp).")
    parser.set_defaults(_accepts_overrides=True)


def run(args) -> int:
    overrides = parse_overrides(args.overrides)
    if args.objective is not None:
        overrides["objective"] = args.objective
    recipe, cfg = pretrain_recipe(args.config, overrides)
    say = rank_zero_speaks()  # under torchrun; the others report errors only
    say("resolved config:\n" + config_text(recipe.name, cfg))
    out = recipe.run(cfg, run_dir=args.out, resume=args.resume, progress=not args.no_progress)
    r = out.result
    first = r.first_metrics or {}
    if "val_loss" in first:
        say(f"before training: val loss {first['val_loss']:.4f}, perplexity {first['val_ppl']:.2f}")
    if "val_loss" in r.metrics:
        say(f"after {r.steps} steps: val loss {r.metrics['val_loss']:.4f}, "
            f"perplexity {r.metrics['val_ppl']:.2f}")
    if r.best_step is not None and r.best_metrics and r.best_metrics != r.metrics:
        say(f"best: val loss {r.best_metrics.get('val_loss', float('nan')):.4f} at step "
            f"{r.best_step} ({args.out}/checkpoints/best)")
    if r.stopped_early:
        say(f"stopped early at step {r.steps}: no improvement in {cfg.optim.patience} "
            "evaluations")
    if r.train_seconds:
        mfu = f", MFU {r.mfu:.1%}" if r.mfu is not None else ""
        say(f"{out.num_parameters / 1e6:.2f}M parameters, {r.tokens_per_second:,.0f} tokens/s"
            f"{mfu}, peak memory {r.peak_memory_mb:,.0f} MiB, {r.train_seconds:.1f} s training")
    else:
        say(f"nothing to train: the run had already reached step {r.steps}")
    say(f"model: {out.run_dir} (lmlab.from_pretrained('{out.run_dir}'))")
    if out.plot:
        say(f"plots: {out.plot}")
    return 0
