"""`omni train` and `omni export`; also `python -m omni.train` (torchrun / deepspeed launchers).

    omni train --config tiny data.train=[...] [--resume auto]
    torchrun --nproc_per_node 2 -m omni.train --config tiny ...
    deepspeed --hostfile hosts --module omni.train --config configs/omni-7b-zero3.yaml ...
    omni export --run runs/tiny --out ckpt/tiny [--ema | --raw] [--tag step00000500]
"""

from __future__ import annotations

import argparse
import sys

TRAIN_EXAMPLES = """examples:
  omni train --config tiny model.tokenizer=TOK_DIR data.train='SHARDS/train-{000000..000003}.tar' \\
      data.val=SHARDS/val-000000.tar train.out_dir=runs/mine
  omni train --config RUN/config.yaml --resume auto          # continue a stopped run
  omni train --config tiny train.init_from=CKPT train.lora.rank=16 'data.task_weights={}' \\
      data.train=... train.out_dir=runs/ft                   # LoRA fine-tune on your own documents
Every key and its default: omni/config.py; guide: docs/training.md."""


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tiny", help="preset name (omni/configs/*.yaml, shipped in the package) or YAML file")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted config overrides")
    p.add_argument("--resume", default=None, metavar="auto|TAG_DIR",
                   help="auto: continue from the run's latest checkpoint (fresh start if none); or a checkpoint dir")
    # The deepspeed launcher passes --local_rank; the rank is read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run_train(args: argparse.Namespace) -> int:
    from omni.config import load_config

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"train.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    from omni.train.loop import TrainingError, train
    from omni.train.runlock import RunLocked

    try:
        run_dir = train(cfg)
    except (TrainingError, RunLocked) as e:
        print(f"omni train: error: {e}", file=sys.stderr)
        return 1
    from omni.utils import is_rank0

    if is_rank0():
        print(f"run dir: {run_dir}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from omni.train.export import export

    out = export(args.run, args.out, ema=args.ema, tag=args.tag, force=args.force, init_from=args.init_from)
    print(f"exported {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (one process; torchrun/deepspeed use -m omni.train)",
                       epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    p.set_defaults(func=run_train)
    e = sub.add_parser("export", help="training checkpoint -> inference checkpoint (safetensors)")
    e.add_argument("--run", required=True, help="run directory (train.out_dir)")
    e.add_argument("--out", required=True, help="output checkpoint directory")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--ema", dest="ema", action="store_const", const=True, default=None,
                   help="EMA weights (default when the run kept an EMA)")
    g.add_argument("--raw", dest="ema", action="store_const", const=False, help="the trained weights")
    e.add_argument("--tag", default=None, help="checkpoint tag, e.g. step00000500 (default: latest)")
    e.add_argument("--force", action="store_true",
                   help="replace --out even when it is not an omni checkpoint (its contents are deleted)")
    e.add_argument("--init-from", default=None, metavar="DIR",
                   help="where the checkpoint the run started from (train.init_from) is now, if it moved: the frozen "
                        "weights a checkpoint leaves there (LoRA's base) are read from it, checked by fingerprint")
    e.set_defaults(func=run_export)


def main(argv: list[str] | None = None) -> int:
    """`python -m omni.train`: the train command alone, errors reported like `omni train`."""
    parser = argparse.ArgumentParser(prog="python -m omni.train", description="omni training (any launcher)")
    add_train_args(parser)
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --resume
    try:
        return run_train(args)
    except Exception as e:
        from omni.errors import describe

        line = describe(e)
        if line is None:
            raise
        print(f"omni train: error: {line}", file=sys.stderr)
        return 2
