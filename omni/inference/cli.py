"""`omni generate` (one-shot, scriptable sampling) and `omni chat` (interactive): their commands.

    omni generate --ckpt DIR --prompt "a red circle" --mode image --out imgs --json
    omni generate --ckpt DIR --prompt "<image> what color is it?" --image cat.png
    omni generate --ckpt DIR --prompts batch.jsonl --json > answers.jsonl

Images given with --image are placed at `<image>` markers in the prompt, in order, or before the
text when the prompt has no markers. A picture that is not the model's size is resized (a
non-square one center-cropped first), with a note on stderr.

Editing: `--image IN.png --prompt "make the circle blue" --mode image` draws the edited picture;
`--edit` says so explicitly (one square picture, before the instruction; mode image) and
`--image-cfg-scale S` turns on image-guided CFG (docs/editing.md).

A JSONL file holds one request per line:
{"prompt": "...", "images": ["a.png"], "seed": 3, "mode": "image"} (only "prompt" is required;
relative image paths resolve against the file's folder). `--json` prints
{"segments": [{"type": "text", "text": ...}, {"type": "image", "path": ...}], "settings": {...}}
per prompt (one line each for a JSONL batch). The sampling flags and their defaults
(the checkpoint's `generation` section) are shared with `omni chat` (omni.inference.chat).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omni.config import MODES, SAMPLERS


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """Flags that override GenerationConfig; unset flags keep the checkpoint's defaults."""
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation settings)")
    g.add_argument("--temperature", type=float, help="text temperature; 0 = greedy")
    g.add_argument("--top-k", type=int, dest="top_k", help="keep the k likeliest text tokens; 0 = off")
    g.add_argument("--top-p", type=float, dest="top_p", help="nucleus sampling mass")
    g.add_argument("--max-new-tokens", type=int, dest="max_new_tokens", help="generated positions per answer")
    g.add_argument("--max-images", type=int, dest="max_images", help="images per answer")
    g.add_argument("--repetition-stop", type=int, dest="repetition_stop",
                   help="stop after this many identical text tokens in a row; 0 = off")
    g.add_argument("--cfg", type=float, dest="cfg_scale", help="classifier-free guidance scale; 1 = off")
    g.add_argument("--image-cfg-scale", type=float, dest="image_cfg_scale",
                   help="edits: guidance by the prompt's picture (InstructPix2Pix; --cfg is the text's); "
                        "unset = the same as --cfg")
    g.add_argument("--steps", type=int, dest="image_steps", help="denoising steps per image token")
    g.add_argument("--image-temperature", type=float, dest="image_temperature", help="image noise scale")
    g.add_argument("--sampler", choices=SAMPLERS, help="image token sampler")
    g.add_argument("--parallel-image", dest="parallel_image", metavar="GROUPS",
                   help="a model trained with model.parallel_image: image tokens per backbone pass, one size "
                        "(4) or a schedule (1,2,4,8); default the trained one (docs/parallel.md)")
    g.add_argument("--no-cache", action="store_false", dest="use_cache", default=None,
                   help="recompute the whole prefix every step (slow; for checking)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")


SAMPLING_KEYS = ("temperature", "top_k", "top_p", "max_new_tokens", "max_images", "repetition_stop",
                 "cfg_scale", "image_cfg_scale", "image_steps", "image_temperature", "sampler", "use_cache",
                 "parallel_image")


def sampling_overrides(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k, None) for k in SAMPLING_KEYS}


def read_requests(args: argparse.Namespace) -> list[dict]:
    """The prompts to run: --prompt/--image, or one JSON object per line of --prompts."""
    if args.prompts is None:
        return [{"prompt": args.prompt, "images": args.image or [], "base": Path.cwd()}]
    path = Path(args.prompts)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    requests = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg}); each line must be one request object") from e
        if not isinstance(req, dict) or not isinstance(req.get("prompt"), str):
            raise ValueError(f'{path}:{n}: each line needs {{"prompt": "..."}}, got {line[:80]!r}')  # noqa: TRY004
        requests.append({**req, "images": req.get("images") or [], "base": path.parent})
    if not requests:
        raise ValueError(f"prompt file {path} holds no requests")
    return requests


def image_name(index: int, seed: int, k: int) -> str:
    return f"p{index:04d}_s{seed}_{k}.png"


def run(args: argparse.Namespace) -> int:
    import torch

    from omni.inference.generate import generate_by_mode, generation_config, load
    from omni.inference.prompts import build_prompt, load_image, size_note
    from omni.utils import check_out_dir, save_png

    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give exactly one of --prompt TEXT or --prompts FILE.jsonl")
    requests = read_requests(args)
    check_out_dir(args.out)  # a file or a read-only folder is refused before generating
    check_edit_flags(args, requests)
    for i, req in enumerate(requests):
        base = req["base"]
        req["paths"] = [p if Path(p).is_absolute() else str(base / p) for p in req["images"]]
        req["segments"] = build_prompt(req["prompt"], [load_image(p) for p in req["paths"]])
        req["mode"] = req.get("mode") or args.mode
        if req["mode"] is not None and req["mode"] not in MODES:
            raise ValueError(f"request {i}: mode {req['mode']!r} is not one of {list(MODES)}")
        if args.edit:
            check_edit_request(req, i if len(requests) > 1 else None)
    model = load(args.ckpt, args.device)
    size = model.image_tokenizer.cfg.image_size
    for req in requests:
        for path, image in zip(req["paths"], [s for s in req["segments"] if not isinstance(s, str)]):
            note = size_note(image, size, path)
            if note:
                print(note, file=sys.stderr)
    cfg = generation_config(model, **sampling_overrides(args))
    seed = args.seed if args.seed is not None else cfg.seed
    for i, req in enumerate(requests):
        req["seed"] = int(req.get("seed", seed + i))
        req["mode"] = req["mode"] or cfg.mode
    torch.manual_seed(seed)  # anything outside the per-row generators is seeded too
    out_dir = Path(args.out)
    results = generate_by_mode(model, [r["segments"] for r in requests], [r["mode"] for r in requests],
                               [r["seed"] for r in requests], cfg, batch_size=args.batch_size, progress=not args.json)
    for i, (req, res) in enumerate(zip(requests, results)):
        segments, k = [], 0
        for seg in res.segments:
            if isinstance(seg, str):
                segments.append({"type": "text", "text": seg})
            else:
                path = out_dir / image_name(i, req["seed"], k)
                save_png(seg, path)
                segments.append({"type": "image", "path": str(path)})
                k += 1
        record = {"segments": segments, "settings": res.settings, "finish_reason": res.finish_reason}
        if args.prompts is not None:
            record = {"prompt": req["prompt"], "images": req["images"], **record}
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print_human(record, i if len(requests) > 1 else None)
    return 0


def check_edit_flags(args: argparse.Namespace, requests: list[dict]) -> None:
    """--edit and --image-cfg-scale need a picture to edit; say so before loading anything."""
    if args.image_cfg_scale is not None and not any(req["images"] for req in requests):
        raise ValueError(f"--image-cfg-scale {args.image_cfg_scale} guides by the picture being edited, but no "
                         "picture was given: add --image IN.png (the picture to edit) or drop --image-cfg-scale")
    if args.edit and args.mode not in (None, "image"):
        raise ValueError(f"--edit draws one picture, but --mode is {args.mode}: drop --mode (or use --mode image)")


def check_edit_request(req: dict, index: int | None) -> None:
    """One request under --edit: exactly one square picture, placed before the instruction."""
    from omni.inference.prompts import check_edit_image

    where = "" if index is None else f"request {index}: "
    n = len(req["images"])
    if n != 1:
        got = "no picture" if n == 0 else f"{n} pictures"
        raise ValueError(f"{where}--edit needs exactly one picture to edit and got {got}: give it with --image IN.png "
                         "(or drop --edit to generate without one)")
    if req["mode"] not in (None, "image"):
        raise ValueError(f"{where}--edit draws one picture, but the request's mode is {req['mode']}: use mode image")
    req["mode"] = "image"
    text_first = isinstance(req["segments"][0], str)
    if text_first:
        raise ValueError(f"{where}--edit reads the picture before the instruction, as editing is trained, but the "
                         "prompt's <image> marker comes after text: put <image> first or drop the marker")
    check_edit_image(req["segments"][0], req["paths"][0])


def run_chat(args: argparse.Namespace) -> int:
    import torch

    from omni.inference.chat import ChatSession, repl
    from omni.inference.generate import generation_config, load
    from omni.inference.preview import supports_color

    torch.set_grad_enabled(False)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file; give a folder for the chat's images")
    model = load(args.ckpt, args.device)
    cfg = generation_config(model, **sampling_overrides(args))
    seed = args.seed if args.seed is not None else cfg.seed
    preview = not args.no_preview and supports_color(sys.stdout)
    session = ChatSession(model, cfg, args.out, seed, preview)
    return repl(session)


def print_human(record: dict, index: int | None) -> None:
    if index is not None:
        print(f"--- {index}: {record['prompt']}")
    for seg in record["segments"]:
        print(seg["text"] if seg["type"] == "text" else f"[image: {seg['path']}]")
    s = record["settings"]
    image_cfg = "" if s.get("image_cfg_scale") is None else f", image cfg {s['image_cfg_scale']}"
    print(f"({record['finish_reason']}; seed {s['seed']}, {s['sampler']} {s['image_steps']} steps, "
          f"cfg {s['cfg_scale']}{image_cfg}, temperature {s['temperature']})", file=sys.stderr)


def positive_int(text: str) -> int:
    """argparse type for counts that must be >= 1 (also used by `omni serve`)."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def register(sub) -> None:
    register_generate(sub)
    register_chat(sub)


def register_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text and images from a checkpoint",
        description=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="inference checkpoint directory")
    p.add_argument("--prompt", help="prompt text; <image> marks where each --image goes")
    p.add_argument("--image", action="append", metavar="PATH", help="attach an image (repeatable, in order)")
    p.add_argument("--prompts", metavar="FILE.jsonl", help="batch: one JSON request per line")
    p.add_argument("--mode", choices=MODES, help="interleaved, text only, or one image")
    p.add_argument("--edit", action="store_true",
                   help="edit the --image as the prompt says (mode image; one square picture)")
    p.add_argument("--out", default="outputs", help="folder for generated PNGs (default: outputs)")
    p.add_argument("--seed", type=int, help="seed of the first prompt; prompt i uses seed + i")
    p.add_argument("--json", action="store_true", help="print JSON (one object per prompt)")
    p.add_argument("--batch-size", type=positive_int, default=8, dest="batch_size", help="prompts per batch")
    add_sampling_flags(p)
    p.set_defaults(func=run)


def register_chat(sub) -> None:
    from omni.inference import chat

    p = sub.add_parser("chat", help="interactive chat that writes text and draws images",
                       description=chat.__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="inference checkpoint directory")
    p.add_argument("--out", default="chat", help="folder for images (default: chat)")
    p.add_argument("--seed", type=int, help="seed of the first answer; answer k uses seed + k")
    p.add_argument("--no-preview", action="store_true", dest="no_preview", help="no inline image previews")
    add_sampling_flags(p)
    p.set_defaults(func=run_chat)
