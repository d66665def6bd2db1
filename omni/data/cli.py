"""`omni data ...`: write the built-in datasets, convert foreign ones, train a text tokenizer.

    omni data shapes    --out DIR [--train N --val N --shard-size N --seed S --size 32 --mix t2i=0.5,...
                                   --val-mix t2i=0.5,...]
    omni data digits    --out DIR [--size 32 --shard-size N]
    omni data tokenizer --shards SPEC [SPEC ...] --out DIR [--vocab-size N]
    omni data convert   --format mmc4|comm --input FILE [FILE ...] --out DIR [--size 32]
    omni data inspect   SPEC [SPEC ...]

Each writer leaves DIR/train-000000.tar ... (and DIR/val-...), a DIR/manifest.json, and prints
the brace patterns to put in data.train / data.val.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _clear_stale(out: Path, prefix: str, keep: list[Path]) -> None:
    """Remove `prefix-*.tar` left by an earlier, larger run (a directory spec would read them)."""
    for path in sorted(out.glob(f"{prefix}-*.tar")):
        if path not in keep:
            path.unlink()
            print(f"removed stale shard {path}")


def _write_split(docs: Iterable, out: Path, prefix: str, shard_size: int, total: int | None) -> dict[str, Any]:
    from omni.data.shards import brace_pattern, write_shards

    tasks: Counter = Counter()

    def counted():
        for d in docs:
            tasks[d.task] += 1
            yield d

    paths = write_shards(counted(), out, prefix, shard_size, total=total)
    _clear_stale(out, prefix, paths)
    return {"pattern": brace_pattern(paths) if paths else None, "shards": [p.name for p in paths],
            "documents": sum(tasks.values()), "tasks": dict(sorted(tasks.items()))}


def _check_dir(out: Path, generator: str) -> None:
    manifest = out / "manifest.json"
    if manifest.exists():
        other = json.loads(manifest.read_text()).get("generator", {}).get("name")
        if other != generator:
            raise ValueError(f"{out} already holds {other!r} shards; write {generator!r} shards to another --out")


def _finish(out: Path, manifest: dict[str, Any]) -> int:
    from omni.utils import atomic_write_text

    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    for split in ("train", "val"):
        info = manifest.get(split)
        if info and info["pattern"]:
            print(f"{split}: {info['documents']} documents in {len(info['shards'])} shard(s)  {info['tasks']}")
    sets = " ".join(f"data.{s}={manifest[s]['pattern']}" for s in ("train", "val") if manifest.get(s, {}).get("pattern"))
    print(f"use: {sets}")
    return 0


def run_shapes(args: argparse.Namespace) -> int:
    from omni.data import shapes

    out = Path(args.out)
    _check_dir(out, "shapes")
    mix = shapes.parse_mix(args.mix)
    val_mix = shapes.parse_mix(args.val_mix) if args.val_mix else mix
    manifest: dict[str, Any] = {"generator": {"name": "shapes", "seed": args.seed, "canvas": args.size, "mix": mix,
                                              "val_mix": val_mix}}
    for split, n, split_mix in (("train", args.train, mix), ("val", args.val, val_mix)):
        if n > 0:
            docs = shapes.generate(n, split, seed=args.seed, canvas=args.size, mix=split_mix)
            manifest[split] = _write_split(docs, out, split, args.shard_size, n)
    return _finish(out, manifest)


def run_digits(args: argparse.Namespace) -> int:
    from omni.data import digits

    out = Path(args.out)
    _check_dir(out, "digits")
    manifest: dict[str, Any] = {"generator": {"name": "digits", "canvas": args.size, "heldout": digits.N_HELDOUT,
                                              "source": "sklearn.datasets.load_digits"}}
    for split, prefix in (("train", "train"), ("heldout", "val")):
        n = 2 * len(digits.split_indices(split))
        manifest[prefix] = _write_split(digits.documents(split, args.size), out, prefix, args.shard_size, n)
    return _finish(out, manifest)


def run_tokenizer(args: argparse.Namespace) -> int:
    from omni.data.document import Stats
    from omni.data.shards import read_documents
    from omni.tokenizers.text import train_sentencepiece

    stats = Stats()
    texts = [t for doc in read_documents(args.shards, decode_images=False, stats=stats) for t in doc.texts if t]
    if stats.counts:
        print(f"skipped while reading: {stats.as_dict()}")
    tok = train_sentencepiece(texts, args.out, vocab_size=args.vocab_size)
    print(f"trained a {len(tok)}-token sentencepiece tokenizer on {len(texts)} texts -> {args.out}")
    print(f"use: model.tokenizer={args.out}")
    return 0


def run_autoencoder(args: argparse.Namespace) -> int:
    from omni.data.document import Stats
    from omni.data.shards import read_documents
    from omni.tokenizers.patch_ae import train_patch_autoencoder

    stats = Stats()
    # Take an image from each --shards spec in turn, so every source gets its share of
    # --max-images (reading them one after another, the first could fill it alone: 30,000 shapes
    # documents left the digits out and the autoencoder never learned grey ink).
    def pictures(spec: str):
        for doc in read_documents(spec, stats=stats):
            yield from (s for s in doc.segments if not isinstance(s, str))

    sources = {spec: pictures(spec) for spec in args.shards}
    per_source = dict.fromkeys(sources, 0)
    images = []
    while sources and len(images) < args.max_images:
        for spec, it in list(sources.items()):
            image = next(it, None)
            if image is None:
                del sources[spec]  # run dry: the others fill its share
                continue
            images.append(image)
            per_source[spec] += 1
            if len(images) >= args.max_images:
                break
    print("images per source: " + ", ".join(f"{spec} {n}" for spec, n in per_source.items()))
    if stats.counts:
        print(f"skipped while reading: {stats.as_dict()}")
    if not images:
        raise SystemExit(f"no images in {args.shards}; point --shards at shards with pictures")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise SystemExit(f"images of several sizes {sorted(sizes)}; the autoencoder needs one size (write shards with one --size)")
    meta = train_patch_autoencoder(images, args.out, patch_size=args.patch_size, latent_dim=args.latent_dim,
                                   hidden=args.hidden, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    t = meta["trained"]
    print(f"trained a {args.patch_size}x{args.patch_size} -> {args.latent_dim} patch autoencoder on {t['images']} images "
          f"({t['patches']} patches) in {t['seconds']} s: mean abs error {t['mean_abs_error_255']} / 255 -> {args.out}")
    print(f"use: model.image.kind=patch-ae model.image.patch_size={args.patch_size} model.image.path={args.out}")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from omni.data.adapters import iter_adapted
    from omni.data.document import Stats

    out = Path(args.out)
    stats = Stats()
    docs = iter_adapted(args.format, args.input, image_size=args.size, stats=stats, root=args.root)
    info = _write_split(docs, out, args.prefix, args.shard_size, None)
    print(f"{args.prefix}: {info['documents']} documents in {len(info['shards'])} shard(s); skipped {stats.as_dict()}")
    print(f"use: data.train={info['pattern']}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from omni.data.document import Stats
    from omni.data.shards import expand_shards, read_documents

    stats = Stats(max_warnings=3)
    tasks: Counter = Counter()
    for doc in read_documents(args.shards, stats=stats):
        tasks[doc.task] += 1
    print(json.dumps({"shards": len(expand_shards(args.shards)), "documents": sum(tasks.values()),
                      "tasks": dict(tasks), "skipped": stats.as_dict()}, indent=2))
    return 0


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
                        "shape or place of one object among two or three; vqa_multi: three questions about one picture)")
    p.add_argument("--val-mix", default=None,
                   help="task shares of the validation split, which the built-in benchmarks read (default: --mix)")
    p.set_defaults(func=run_shapes)

    p = sub.add_parser("digits", help="real handwritten digits (scikit-learn) with a held-out split")
    p.add_argument("--out", required=True, help="output directory for train-*.tar / val-*.tar (held out)")
    p.add_argument("--size", type=int, default=32, help="canvas side in pixels")
    p.add_argument("--shard-size", type=int, default=500, help="documents per shard")
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
    p.set_defaults(func=run_convert)

    p = sub.add_parser("inspect", help="count documents per task and bad samples in shards")
    p.add_argument("shards", nargs="+", help="shard specs")
    p.set_defaults(func=run_inspect)
