"""Writers of the built-in datasets and the trained tokenizers: what `omni data` and the demo call.

    write_shapes(out, n_train, n_val, ...)     synthetic interleaved documents (omni.data.shapes)
    write_digits(out, ...)                     scikit-learn's handwritten digits (omni.data.digits)
    train_tokenizer(shards, out, vocab_size)   a sentencepiece text tokenizer on the shards' texts
    train_autoencoder(shards, out, ...)        the per-patch image autoencoder (patch-ae tokens)

Each dataset writer leaves OUT/train-000000.tar ... (and OUT/val-...), OUT/manifest.json, and
prints the brace patterns to put in data.train / data.val.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _clear_stale(out: Path, prefix: str, keep: list[Path]) -> None:
    """Remove `prefix-*.tar` left by an earlier, larger run (a directory spec would read them).
    `_check_dir` made sure before writing that every such shard was omni's (or --force)."""
    for path in sorted(out.glob(f"{prefix}-*.tar")):
        if path not in keep:
            path.unlink()
            print(f"removed stale shard {path}")


def _write_split(docs: Iterable, out: Path, prefix: str, shard_size: int, total: int | None) -> dict[str, Any]:
    from omni.data.shards import write_shards

    tasks: Counter = Counter()

    def counted():
        for d in docs:
            tasks[d.task] += 1
            yield d

    return _split_entry(out, prefix, write_shards(counted(), out, prefix, shard_size, total=total), tasks)


def _split_entry(out: Path, prefix: str, paths: list[Path], tasks: Counter) -> dict[str, Any]:
    """A written split's manifest entry, after removing the stale shards an earlier, larger run left."""
    from omni.data.shards import brace_pattern

    _clear_stale(out, prefix, paths)
    return {"pattern": brace_pattern(paths) if paths else None, "shards": [p.name for p in paths],
            "documents": sum(tasks.values()), "tasks": dict(sorted(tasks.items()))}


def _shapes_shard(out: Path, prefix: str, shard_size: int, k: int, tasks: list[str], seed: int, canvas: int,
                  phrasing: str, edit_kinds: dict[str, float] | None = None) -> tuple[int, list[Path], Counter]:
    """Shard k of a shapes split, written in a worker process: exactly the serial writer's shard k."""
    from omni.data import shapes
    from omni.data.shards import ShardWriter

    tasks_done: Counter = Counter()
    with ShardWriter(out, prefix, shard_size, first=k) as writer:
        for doc in shapes.documents(tasks, k * shard_size, prefix, seed, canvas, phrasing, edit_kinds):
            tasks_done[doc.task] += 1
            writer.write(doc)
    return k, writer.paths, tasks_done


def _write_shapes_split(out: Path, split: str, n: int, mix: dict[str, float], seed: int, canvas: int,
                        phrasing: str, shard_size: int, workers: int,
                        edit_kinds: dict[str, float] | None = None) -> dict[str, Any]:
    """A shapes split, its shards made by `workers` processes (byte-identical to one process's:
    document i depends only on (seed, split, i, its task) and shard k holds documents k*size ...)."""
    from omni.data import shapes

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    plan = shapes.task_plan(n, mix, seed, split)
    if workers <= 1 or n <= shard_size:
        return _write_split(shapes.documents(plan, 0, split, seed, canvas, phrasing, edit_kinds), out, split,
                            shard_size, n)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    jobs = range(-(-n // shard_size))
    done: dict[int, list[Path]] = {}
    tasks: Counter = Counter()
    # spawn: the parent may hold torch's thread pools, which a forked child must not inherit
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool, \
            tqdm(total=n, desc=f"{split} shards", unit="doc") as bar:
        futures = [pool.submit(_shapes_shard, out, split, shard_size, k, plan[k * shard_size:(k + 1) * shard_size],
                               seed, canvas, phrasing, edit_kinds) for k in jobs]
        for future in as_completed(futures):
            k, paths, counts = future.result()
            done[k] = paths
            tasks.update(counts)
            bar.update(sum(counts.values()))
    return _split_entry(out, split, [p for k in sorted(done) for p in done[k]], tasks)


def _check_dir(out: Path, generator: str | None, force: bool = False, prefixes: tuple[str, ...] = ("train", "val")) -> None:
    """Writing replaces `train-*.tar` / `val-*.tar` in `out` and removes the stale ones: allowed only
    for shards an earlier run of the same writer made (listed in its manifest.json), or `force`.
    `generator=None` (omni data convert, which writes no manifest): any such shard is foreign."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; choose a directory for the shards")
    manifest = out / "manifest.json"
    owned: set[str] = set()
    if manifest.exists() and generator is not None:
        try:
            old = json.loads(manifest.read_text())
        except ValueError:
            old = {}
        other = old.get("generator", {}).get("name")
        if other != generator and not force:
            raise ValueError(f"{out} already holds {other!r} shards; write {generator!r} shards to another --out "
                             "(or pass --force to replace them)")
        owned = {name for split in ("train", "val") for name in (old.get(split) or {}).get("shards", [])}
    foreign = sorted(p.name for prefix in prefixes for p in out.glob(f"{prefix}-*.tar") if p.name not in owned)
    if foreign and not force:
        raise FileExistsError(
            f"--out {out} holds shards that omni data did not write there ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): writing would replace or delete them. Choose a new or empty "
            "--out, or pass --force to replace them"
        )


def _finish(out: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    from omni.utils import atomic_write_text

    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    for split in ("train", "val"):
        info = manifest.get(split)
        if info and info["pattern"]:
            print(f"{split}: {info['documents']} documents in {len(info['shards'])} shard(s)  {info['tasks']}")
    sets = " ".join(f"data.{s}={manifest[s]['pattern']}" for s in ("train", "val") if manifest.get(s, {}).get("pattern"))
    print(f"use: {sets}")
    return manifest


def _check_phrasing(phrasing: str, n_train: int) -> None:
    from omni.data.phrasing import check_mode

    check_mode(phrasing)
    if phrasing == "heldout" and n_train > 0:
        raise ValueError(f"held-out phrasings are never written to training shards (asked for {n_train} training "
                         "documents); write them as a validation split only: --train 0 (shapes) or a digits "
                         "directory of its own, read by the benchmarks as their held-out phrasing split")


def write_shapes(out: str | Path, n_train: int, n_val: int, *, seed: int = 0, canvas: int = 32,
                 mix: str | None = None, val_mix: str | None = None, shard_size: int = 500,
                 force: bool = False, phrasing: str = "train", workers: int = 1,
                 edit_kinds: str | None = None) -> dict[str, Any]:
    """Shapes documents; `mix` / `val_mix` as `omni data shapes --mix` text (None: the default mix;
    val_mix None: the training mix); `phrasing` the texts' wording (omni.data.phrasing: train,
    heldout -- validation documents only -- or template); `edit_kinds` as `--edit-kinds` text
    (`swap=3`: how often edit documents start with each kind, over the defaults); `workers`
    processes write the shards (the same bytes as one). Returns the manifest."""
    from omni.data import shapes

    out = Path(out)
    _check_phrasing(phrasing, n_train)
    _check_dir(out, "shapes", force)
    train_mix = shapes.parse_mix(mix)
    held_mix = shapes.parse_mix(val_mix) if val_mix else train_mix
    kinds = shapes.parse_edit_kinds(edit_kinds)
    manifest: dict[str, Any] = {"generator": {"name": "shapes", "seed": seed, "canvas": canvas, "mix": train_mix,
                                              "val_mix": held_mix, "phrasing": phrasing}}
    if kinds:  # recorded only when given, so the default's manifests stay as they were
        manifest["generator"]["edit_kinds"] = shapes.edit_kind_weights(kinds)
    for split, n, split_mix in (("train", n_train, train_mix), ("val", n_val, held_mix)):
        if n > 0:
            manifest[split] = _write_shapes_split(out, split, n, split_mix, seed, canvas, phrasing, shard_size, workers,
                                                  kinds or None)
    return _finish(out, manifest)


def write_digits(out: str | Path, *, canvas: int = 32, shard_size: int = 500, force: bool = False,
                 phrasing: str = "train") -> dict[str, Any]:
    """The handwritten digits as t2i and read documents, training and held-out splits; the manifest.
    `phrasing="heldout"` writes the held-out images only (val-*.tar), in the held-out phrasings."""
    from omni.data import digits

    out = Path(out)
    from omni.data.phrasing import check_mode

    check_mode(phrasing)
    _check_dir(out, "digits", force)
    manifest: dict[str, Any] = {"generator": {"name": "digits", "canvas": canvas, "heldout": digits.N_HELDOUT,
                                              "source": "sklearn.datasets.load_digits", "phrasing": phrasing}}
    splits = (("heldout", "val"),) if phrasing == "heldout" else (("train", "train"), ("heldout", "val"))
    for split, prefix in splits:
        n = 2 * len(digits.split_indices(split))
        manifest[prefix] = _write_split(digits.documents(split, canvas, phrasing), out, prefix, shard_size, n)
    return _finish(out, manifest)


def train_tokenizer(shards: list[str], out: str | Path, vocab_size: int = 384):
    """A sentencepiece tokenizer on every text of `shards`, saved to `out`; the tokenizer."""
    from omni.data.document import Stats
    from omni.data.shards import read_documents
    from omni.tokenizers.text import train_sentencepiece

    stats = Stats()
    texts = [t for doc in read_documents(shards, decode_images=False, stats=stats) for t in doc.texts if t]
    if stats.counts:
        print(f"skipped while reading: {stats.as_dict()}")
    tok = train_sentencepiece(texts, out, vocab_size=vocab_size)
    print(f"trained a {len(tok)}-token sentencepiece tokenizer on {len(texts)} texts -> {out}")
    print(f"use: model.tokenizer={out}")
    return tok


def train_autoencoder(shards: list[str], out: str | Path, *, patch_size: int = 8, latent_dim: int = 16,
                      hidden: int = 512, steps: int = 3000, batch_size: int = 512, seed: int = 0,
                      max_images: int = 20000) -> dict[str, Any]:
    """The per-patch image autoencoder on pictures of `shards` (a fair share of each); its metadata."""
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

    sources = {spec: pictures(spec) for spec in shards}
    per_source = dict.fromkeys(sources, 0)
    images = []
    while sources and len(images) < max_images:
        for spec, it in list(sources.items()):
            image = next(it, None)
            if image is None:
                del sources[spec]  # run dry: the others fill its share
                continue
            images.append(image)
            per_source[spec] += 1
            if len(images) >= max_images:
                break
    print("images per source: " + ", ".join(f"{spec} {n}" for spec, n in per_source.items()))
    if stats.counts:
        print(f"skipped while reading: {stats.as_dict()}")
    if not images:
        raise ValueError(f"no images in {shards}; point --shards at shards with pictures")
    sizes = {im.size for im in images}
    if len(sizes) > 1:
        raise ValueError(f"images of several sizes {sorted(sizes)}; the autoencoder needs one size (write shards with one --size)")
    meta = train_patch_autoencoder(images, out, patch_size=patch_size, latent_dim=latent_dim,
                                   hidden=hidden, steps=steps, batch_size=batch_size, seed=seed)
    t = meta["trained"]
    print(f"trained a {patch_size}x{patch_size} -> {latent_dim} patch autoencoder on {t['images']} images "
          f"({t['patches']} patches) in {t['seconds']} s: mean abs error {t['mean_abs_error_255']} / 255 -> {out}")
    print(f"use: model.image.kind=patch-ae model.image.patch_size={patch_size} model.image.path={out}")
    return meta
