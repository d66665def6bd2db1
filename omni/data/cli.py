"""`omni data ...`: write the built-in datasets, convert foreign ones, train a text tokenizer.

    omni data shapes    --out DIR [--train N --val N --shard-size N --seed S --size 32 --mix t2i=0.5,...
                                   --val-mix t2i=0.5,... --phrasing train|heldout|template --edit-kinds swap=3
                                   --workers N]
    omni data digits    --out DIR [--size 32 --shard-size N --phrasing train|heldout|template]
    omni data tokenizer --shards SPEC [SPEC ...] --out DIR [--vocab-size N]
    omni data convert   --format mmc4|comm --input FILE [FILE ...] --out DIR [--size 32]
    omni data inspect   [SPEC ...] [--config CFG [--set KEY=VALUE ...]] [--limit N]

Each writer leaves DIR/train-000000.tar ... (and DIR/val-...), a DIR/manifest.json, and prints
the brace patterns to put in data.train / data.val.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from collections import Counter
from pathlib import Path


def default_workers() -> int:
    """Shard-writing processes: the CPUs this process may use, at most 8."""
    import os

    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def run_shapes(args: argparse.Namespace) -> int:
    from omni.data.writers import write_shapes

    write_shapes(args.out, args.train, args.val, seed=args.seed, canvas=args.size, mix=args.mix,
                 val_mix=args.val_mix, shard_size=args.shard_size, force=args.force, phrasing=args.phrasing,
                 workers=args.workers, edit_kinds=args.edit_kinds)
    return 0


def run_digits(args: argparse.Namespace) -> int:
    from omni.data.writers import write_digits

    write_digits(args.out, canvas=args.size, shard_size=args.shard_size, force=args.force, phrasing=args.phrasing)
    return 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from omni.data.writers import train_tokenizer

    train_tokenizer(args.shards, args.out, vocab_size=args.vocab_size)
    return 0


def run_autoencoder(args: argparse.Namespace) -> int:
    from omni.data.writers import train_autoencoder

    train_autoencoder(args.shards, args.out, patch_size=args.patch_size, latent_dim=args.latent_dim,
                      hidden=args.hidden, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                      max_images=args.max_images)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from omni.data.adapters import iter_adapted
    from omni.data.document import Stats
    from omni.data.writers import _check_dir, _write_split

    out = Path(args.out)
    _check_dir(out, None, args.force, prefixes=(args.prefix,))
    stats = Stats()
    docs = iter_adapted(args.format, args.input, image_size=args.size, stats=stats, root=args.root)
    info = _write_split(docs, out, args.prefix, args.shard_size, None)
    print(f"{args.prefix}: {info['documents']} documents in {len(info['shards'])} shard(s); skipped {stats.as_dict()}")
    if not info["documents"]:
        print(f"omni: error: no {args.format} document could be converted from {' '.join(args.input)} (skipped: "
              f"{stats.as_dict() or 'nothing; the input holds no records'}); is --format right? (mmc4: objects with "
              "'text_list' and 'image_info'; comm: lists of text/image items)", file=sys.stderr)
        return 1
    print(f"use: data.train={info['pattern']}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from omni.data.document import Stats
    from omni.data.shards import read_documents

    cfg = None
    if args.config:
        from omni.config import load_config

        cfg = load_config(args.config, args.set)
    elif args.set:
        raise SystemExit("omni data inspect: --set needs --config (the config it overrides)")
    shards = args.shards or (cfg.data.train if cfg is not None else None)
    if not shards:
        raise SystemExit("omni data inspect: name shard specs, or --config CONFIG to read its data.train")
    measure = positions_counter(cfg) if cfg is not None else None
    urls = interleaved(shards)
    stats = Stats(max_warnings=3)
    tasks: Counter = Counter()
    lengths: dict[str, list[int]] = {}
    for doc in read_documents(urls, stats=stats):
        if measure is not None:
            n = measure(doc, stats)
            if n is None:
                continue
            lengths.setdefault(doc.task, []).append(n)
        tasks[doc.task] += 1
        if args.limit and sum(tasks.values()) >= args.limit:
            break
    report = {"shards": len(urls), "documents": sum(tasks.values()), "tasks": dict(tasks),
              "skipped": stats.as_dict()}
    if cfg is not None:
        report.update(mix_report(cfg, lengths))
    print(json.dumps(report, indent=2))
    return 0


def interleaved(specs) -> list[str]:
    """The shards of every spec (and of every `::` part of one), taken in turn from each, so that
    the first documents read (`--limit`) come from all of them."""
    from omni.data.shards import expand_shards

    specs = [specs] if isinstance(specs, (str, Path)) else specs
    parts = [expand_shards(part) for spec in specs for part in str(spec).split("::")]
    return [url for group in itertools.zip_longest(*parts) for url in group if url is not None]


def positions_counter(cfg):
    """doc -> the positions it takes in a training row under `cfg` (tokenizer, image tokens per
    picture, templates; without CFG drops), or None (counted in `stats`) when the loader would skip it."""
    from omni.data.document import BadSample
    from omni.data.loader import prepare_document
    from omni.layout import doc_length
    from omni.tokenizers.image import build_image_tokenizer
    from omni.tokenizers.text import TextTokenizer

    root = Path(cfg.train.init_from) if cfg.train.init_from else None
    image = cfg.model.image
    if root is not None:  # the checkpoint's tokenizer and image settings, as training reads them
        from omni.config import load_config

        if not (root / "config.yaml").is_file():
            raise SystemExit(f"omni data inspect: train.init_from={str(root)!r} holds no config.yaml (not an omni checkpoint)")
        image = load_config(root / "config.yaml").model.image
        tokenizer = TextTokenizer.from_pretrained(root / "tokenizer")
    elif cfg.model.tokenizer is None:
        raise SystemExit("omni data inspect: the config sets no model.tokenizer; --set model.tokenizer=DIR")
    else:
        tokenizer = TextTokenizer.from_pretrained(cfg.model.tokenizer)
    image_tokenizer = build_image_tokenizer(image, root=root)
    queries = cfg.model.parallel_image != "off"
    encode = functools.lru_cache(maxsize=1 << 16)(tokenizer.encode)

    def positions(doc, stats) -> int | None:
        try:
            return doc_length(prepare_document(doc, encode, image_tokenizer), queries=queries)
        except BadSample as e:
            stats.add(e.reason, e.detail)
            return None

    return positions


def mix_report(cfg, lengths: dict[str, list[int]]) -> dict:
    """Positions per document by task and, with data.task_weights, what each task costs a step:
    its share of the documents drawn and of the row positions they fill."""
    seq_len = cfg.data.seq_len
    out: dict = {"positions": {t: {"mean": round(sum(v) / len(v), 1), "max": max(v),
                                   "over_seq_len": sum(n > seq_len for n in v)}
                               for t, v in sorted(lengths.items())}}
    weights = {t: w for t, w in cfg.data.task_weights.items() if w > 0}
    if not weights:
        return out
    missing = sorted(t for t in weights if t not in lengths)
    mean = {t: sum(lengths[t]) / len(lengths[t]) for t in weights if t in lengths}
    total_w = sum(weights[t] for t in mean)
    per_doc = sum(weights[t] * mean[t] for t in mean) / total_w if total_w else 0.0
    out["mix"] = {
        "seq_len": seq_len,
        "batch_size": cfg.data.batch_size,
        "positions_per_document": round(per_doc, 1),
        # Rows filled to the last position; packing leaves a few percent empty (docs/demo.md).
        "documents_per_step_at_most": round(cfg.data.batch_size * seq_len / per_doc, 1) if per_doc else None,
        "tasks": {t: {"weight": weights[t], "document_share": round(weights[t] / total_w, 3),
                      "position_share": round(weights[t] * mean[t] / (per_doc * total_w), 3)}
                  for t in mean},
    }
    if missing:
        out["mix"]["weighted_tasks_without_documents"] = missing
    return out


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="write datasets, convert shards, train the text tokenizer and image autoencoder")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    data.set_defaults(func=lambda args: data.print_help() or 2)

    p = sub.add_parser("shapes", help="synthetic interleaved shapes world with exact ground truth")
    p.add_argument("--out", required=True, help="output directory for train-*.tar / val-*.tar")
    p.add_argument("--train", type=int, default=2000, help="training documents")
    p.add_argument("--val", type=int, default=200, help="validation documents (own seeds, disjoint)")
    p.add_argument("--shard-size", type=int, default=500, help="documents per shard")
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--size", type=int, default=32, help="canvas side in pixels")
    p.add_argument("--mix", default=None,
                   help="task shares (default t2i=0.45,caption=0.15,vqa=0.2,story=0.12,text=0.08; "
                        "vqa_position: VQA that asks only where objects are; vqa_binding: VQA that asks the colour, "
                        "shape or place of one object among two or three; vqa_multi: three questions about one picture; "
                        "t2i_position: drawing two objects in a named relation; t2i_counting: drawing 1-4 objects of one kind; "
                        "edit: a scene, an instruction, the edited scene (sometimes a second round); chat: greetings and "
                        "\"what can you do?\" answered in a sentence)")
    p.add_argument("--val-mix", default=None,
                   help="task shares of the validation split, which the built-in benchmarks read (default: --mix)")
    p.add_argument("--phrasing", default="train", choices=["train", "heldout", "template"],
                   help="how the requests are worded (omni.data.phrasing): train (varied, the default), heldout "
                        "(phrasings that never occur in training; validation documents only), template (the one fixed form)")
    p.add_argument("--edit-kinds", default=None, metavar="KIND=W,...",
                   help="how often edit documents start with each kind, over the default weights recolor=1,move=1,"
                        "remove=0.75,add=0.75,swap=1.5 (e.g. swap=3)")
    p.add_argument("--force", action="store_true", help="replace train-*.tar / val-*.tar in --out that omni did not write")
    workers = default_workers()
    p.add_argument("--workers", type=_positive, default=workers,
                   help=f"processes writing shards, each a whole shard (default: the CPU count up to 8, here "
                        f"{workers}); the shards are the same bytes for any number")
    p.set_defaults(func=run_shapes)

    p = sub.add_parser("digits", help="real handwritten digits (scikit-learn) with a held-out split")
    p.add_argument("--out", required=True, help="output directory for train-*.tar / val-*.tar (held out)")
    p.add_argument("--size", type=int, default=32, help="canvas side in pixels")
    p.add_argument("--shard-size", type=int, default=500, help="documents per shard")
    p.add_argument("--force", action="store_true", help="replace train-*.tar / val-*.tar in --out that omni did not write")
    p.add_argument("--phrasing", default="train", choices=["train", "heldout", "template"],
                   help="how the requests are worded (omni.data.phrasing): train (varied, the default), heldout "
                        "(phrasings that never occur in training; validation documents only), template (the one fixed form)")
    p.set_defaults(func=run_digits)

    p = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer on the shards' text")
    p.add_argument("--shards", nargs="+", required=True, help="shard specs (paths, dirs, brace patterns)")
    p.add_argument("--out", required=True, help="tokenizer directory (set model.tokenizer to it)")
    p.add_argument("--vocab-size", type=int, default=384, help="vocabulary size (small corpora may give fewer)")
    p.set_defaults(func=run_tokenizer)

    p = sub.add_parser("autoencoder", help="train a per-patch image autoencoder (model.image.kind=patch-ae)")
    p.add_argument("--shards", nargs="+", required=True, help="shard specs whose images it learns")
    p.add_argument("--out", required=True, help="output directory (set model.image.path to it)")
    p.add_argument("--patch-size", type=int, default=8, help="pixels per patch side (default 8)")
    p.add_argument("--latent-dim", type=int, default=16, help="values per token (default 16)")
    p.add_argument("--hidden", type=int, default=512, help="MLP width (default 512)")
    p.add_argument("--steps", type=int, default=3000, help="training steps of 512 patches (default 3000)")
    p.add_argument("--batch-size", type=int, default=512, help="patches per step (default 512)")
    p.add_argument("--max-images", type=int, default=20000, help="images read at most, shared out over the --shards specs in turn (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=run_autoencoder)

    p = sub.add_parser("convert", help="MMC4 / CoMM-style records -> omni shards")
    p.add_argument("--format", required=True, choices=["mmc4", "comm"], help="input encoding")
    p.add_argument("--input", nargs="+", required=True, help=".jsonl / .json files or webdataset shards of json records")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--prefix", default="train", help="shard name prefix")
    p.add_argument("--size", type=int, default=32, help="center-crop and resize images to this square size")
    p.add_argument("--shard-size", type=int, default=500, help="documents per shard")
    p.add_argument("--root", default=None, help="directory that image paths in CoMM records are relative to")
    p.add_argument("--force", action="store_true", help="replace train-*.tar / val-*.tar in --out that omni did not write")
    p.set_defaults(func=run_convert)

    p = sub.add_parser("inspect", help="count documents per task and bad samples in shards; with --config, the "
                                        "positions each task's documents take and each task's share of a step")
    p.add_argument("shards", nargs="*", help="shard specs (default with --config: its data.train)")
    p.add_argument("--config", default=None,
                   help="preset or YAML whose tokenizer, image settings, seq_len and task weights measure the documents")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override of --config, e.g. --set data.task_weights.story=0.06 (repeatable)")
    p.add_argument("--limit", type=_positive, default=None, help="read at most N documents")
    p.set_defaults(func=run_inspect)
