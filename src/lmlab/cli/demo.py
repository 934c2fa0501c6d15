from __future__ import annotations

from lmlab.demo import run_demo


def add_arguments(parser) -> None:
    parser.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget (default 5)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train exactly this many steps instead of filling the budget")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    parser.add_argument("--no-progress", action="store_true")


def run(args) -> int:
    print("lmlab demo: a GPT pretrained on the Python standard library's own source code")
    demo = run_demo(out=args.out, minutes=args.minutes, steps=args.steps,
                    progress=not args.no_progress)
    p, r = demo.pretrain, demo.pretrain.result
    print(f"\ncorpus: {demo.train_files} train files, {demo.val_files} validation files")
    print(f"model: {p.num_parameters / 1e6:.2f}M parameters, {r.steps} steps, "
          f"{r.tokens_per_second:,.0f} tokens/s")
    if r.first_metrics:
        print(f"validation before training: loss {r.first_metrics['val_loss']:.3f}, "
              f"perplexity {r.first_metrics['val_ppl']:.1f}")
    print(f"validation after training:  loss {r.metrics['val_loss']:.3f}, "
          f"perplexity {r.metrics['val_ppl']:.1f}")
    for c in demo.continuations:
        print("\n" + "=" * 72)
        print(f"--- greedy ---\n{c.prompt}{c.greedy}")
        print(f"--- top-p 0.9, temperature 0.8 ---\n{c.prompt}{c.sampled}")
    print("=" * 72)
    print(f"\ncheckpoint: {p.run_dir} (Hugging Face layout); loss curve: {p.plot}")
    print(f"total time: {demo.seconds:.0f} s")
    return 0
