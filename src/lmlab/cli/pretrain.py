from __future__ import annotations

from lmlab.config import dump_yaml, load_config, parse_overrides
from lmlab.training.pretrain import PretrainConfig, pretrain


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="YAML preset, e.g. configs/pretrain/shakespeare_char.yaml")
    parser.add_argument("--out", required=True, help="run directory (model, checkpoints, logs)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.epilog = "Any config key can be overridden: --data PATH --max_steps 100 --lr 3e-4 …"
    parser.set_defaults(_accepts_overrides=True)


def run(args) -> int:
    cfg = load_config(PretrainConfig, args.config, parse_overrides(args.overrides))
    print("resolved config:\n" + dump_yaml(cfg))
    out = pretrain(cfg, run_dir=args.out, resume=args.resume, progress=not args.no_progress)
    r = out.result
    first = r.first_metrics or {}
    if "val_loss" in first:
        print(f"before training: val loss {first['val_loss']:.4f}, perplexity {first['val_ppl']:.2f}")
    if "val_loss" in r.metrics:
        print(f"after {r.steps} steps: val loss {r.metrics['val_loss']:.4f}, "
              f"perplexity {r.metrics['val_ppl']:.2f}")
    if r.train_seconds:
        print(f"{out.num_parameters / 1e6:.2f}M parameters, {r.tokens_per_second:,.0f} tokens/s, "
              f"{r.train_seconds:.1f} s training")
    else:
        print(f"nothing to train: the run had already reached step {r.steps}")
    print(f"model: {out.run_dir} (lmlab.from_pretrained('{out.run_dir}'))")
    if out.plot:
        print(f"loss curve: {out.plot}")
    return 0
