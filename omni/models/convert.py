"""`omni convert chameleon`: a Hugging Face Chameleon checkpoint -> an omni checkpoint (Orthus path).

Chameleon (and Anole, Lumina-mGPT) read images as discrete VQGAN codes. The conversion keeps the
backbone and the VQGAN and changes only how images enter and leave:

    image -> VQGAN encoder + quant_conv (no quantization) -> tokens x 0.1     (vq-features tokenizer)
    token -> soft-VQ over codebook_in -> mix of the image-token embeddings    (in_proj = soft-vq)
    hidden -> fresh diffusion head -> next image token -> VQGAN decoder       (generation)

The backbone stays a `ChameleonForConditionalGeneration` with its own parameter names
(`backbone.model.layers.0...`, `backbone.lm_head.weight`), minus its VQGAN, which lives once in
DIR/vqgan/ (`omni.models.backbone.prepare_chameleon_backbone`). `<boi>`/`<eoi>` are Chameleon's `<racm3:break>` and
`<eoss>`; image positions carry its `<image>` placeholder.

Memory: backbone tensors are copied byte for byte from the source shards into the output file,
one bounded chunk at a time, and never become torch tensors; the model is built on the meta
device. Peak memory is the VQGAN, the new parameters and one chunk, not the model (a 7B
checkpoint converts in a few GB of RAM).
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CHAMELEON_SPECIAL = {"boi": "<racm3:break>", "eoi": "<eoss>", "img": "<image>"}
CHUNK_BYTES = 64 << 20  # copy buffer for streamed tensors
WEIGHTS = "model.safetensors"

# safetensors dtype name -> (torch dtype attribute, bytes per element); the format is little-endian
DTYPES = {"F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
          "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
          "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
          "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1)}


# --------------------------------------------------------------------------------------------
# Streaming safetensors: read headers, copy bytes, write one file without a second model copy
# --------------------------------------------------------------------------------------------


@dataclass
class SourceTensor:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> dict[str, SourceTensor]:
    """Tensor table of one .safetensors file (no data read)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {
        name: SourceTensor(
            path,
            e["dtype"],
            tuple(e["shape"]),
            8 + n + e["data_offsets"][0],
            e["data_offsets"][1] - e["data_offsets"][0],
        )
        for name, e in header.items()
    }


def source_tensors(src: Path) -> dict[str, SourceTensor]:
    """All tensors of a HF checkpoint directory (model.safetensors, or shards listed by the index)."""
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = [src / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [src / WEIGHTS] if (src / WEIGHTS).exists() else []
    if not files:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {', '.join(pickles)}: re-save it with safe_serialization=True)" if pickles else ""
        raise FileNotFoundError(f"{src} holds no .safetensors weights{hint}; omni never unpickles weights")
    table: dict[str, SourceTensor] = {}
    for f in files:
        table.update(read_header(f))
    return table


def load_source_tensor(t: SourceTensor, rows: tuple[int, int] | None = None):
    """Materialise one (small) source tensor, or only its rows [lo, hi) (a slice of the embeddings)."""
    import torch

    lo, hi = rows if rows is not None else (0, t.shape[0] if t.shape else 1)
    row_bytes = t.nbytes // max(t.shape[0], 1) if t.shape else t.nbytes
    buf = bytearray((hi - lo) * row_bytes)
    with open(t.file, "rb") as f:
        f.seek(t.start + lo * row_bytes)
        f.readinto(buf)
    shape = (hi - lo, *t.shape[1:]) if t.shape else ()
    dtype = getattr(torch, DTYPES[t.dtype][0])
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)  # owns `buf`, no copy


def _st_dtype(dtype) -> str:
    """torch dtype -> safetensors dtype name."""
    import torch

    for name, (attr, _) in DTYPES.items():
        if getattr(torch, attr, None) == dtype:
            return name
    raise ValueError(f"safetensors has no dtype for {dtype}")


def write_safetensors(path: Path, entries: dict, metadata: dict[str, str] | None = None,
                      progress=None) -> int:
    """Write `entries` (name -> SourceTensor copied byte for byte, or an in-memory torch tensor).

    The header is computed first from shapes alone; data follows, one tensor at a time. Larger
    element sizes come first so every tensor is naturally aligned. Returns the bytes written.
    """
    import torch

    def info(v):
        if isinstance(v, SourceTensor):
            return v.dtype, list(v.shape), v.nbytes
        return _st_dtype(v.dtype), list(v.shape), v.numel() * v.element_size()

    order = sorted(entries, key=lambda k: -DTYPES[info(entries[k])[0]][1])  # stable: keeps model order
    header: dict[str, object] = {"__metadata__": metadata or {}}
    offset = 0
    for name in order:
        dtype, shape, nbytes = info(entries[name])
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for name in order:
            v = entries[name]
            if isinstance(v, SourceTensor):
                with open(v.file, "rb") as f:
                    f.seek(v.start)
                    left = v.nbytes
                    while left:
                        chunk = f.read(min(CHUNK_BYTES, left))
                        out.write(chunk)
                        left -= len(chunk)
            else:
                t = v.detach().contiguous().cpu().reshape(-1)
                out.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
            if progress is not None:
                progress.update(1)
    return offset


# --------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------


def _vqgan_state(src_tensors: dict[str, SourceTensor], vqgan_file: Path | None, names: set[str]) -> dict:
    """VQGAN weights: the source's model.vqmodel.*, completed (decoder) from `vqgan_file`."""
    import torch

    state = {}
    for name, t in src_tensors.items():
        for prefix in ("model.vqmodel.", "vqmodel."):
            if name.startswith(prefix) and name[len(prefix) :] in names:
                state[name[len(prefix) :]] = load_source_tensor(t)
    if vqgan_file is not None:
        vqgan_file = Path(vqgan_file)
        if vqgan_file.suffix == ".safetensors":
            from safetensors.torch import load_file

            extra = load_file(str(vqgan_file))
        else:  # the original release ships tokenizer/vqgan.ckpt; tensors only, never arbitrary objects
            try:
                extra = torch.load(str(vqgan_file), map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(
                    f"{vqgan_file} cannot be read as plain tensors ({type(e).__name__}); convert it to "
                    "safetensors (safetensors.torch.save_file(ckpt['state_dict'], 'vqgan.safetensors'))"
                ) from e
            extra = extra.get("state_dict", extra)
        for name, v in extra.items():
            key = name.removeprefix("model.vqmodel.").removeprefix("vqmodel.")
            if key in names and key not in state:
                state[key] = v
    return state


def chameleon_model_config(
    hf_cfg,
    preset: str,
    overrides: list[str],
    scale: float | None = None,
    tau: float | None = None,
    image_size: int | None = None,
):
    """The omni Config of a converted checkpoint: the preset's recipe + the Chameleon's shapes.

    scale / tau / image_size given here win over the preset; left None, the preset's values stay
    (image_size then defaults to the VQGAN's resolution unless an override set it).
    """
    from omni.config import load_config

    cfg = load_config(preset, overrides)
    m = cfg.model
    m.backbone.arch = "chameleon"
    m.backbone.pretrained = None
    m.backbone.hidden_size = hf_cfg.hidden_size
    m.backbone.num_layers = hf_cfg.num_hidden_layers
    m.backbone.num_heads = hf_cfg.num_attention_heads
    m.backbone.num_kv_heads = hf_cfg.num_key_value_heads
    m.backbone.intermediate_size = hf_cfg.intermediate_size
    m.backbone.max_position_embeddings = hf_cfg.max_position_embeddings
    m.backbone.rope_theta = float((hf_cfg.rope_parameters or {}).get("rope_theta", m.backbone.rope_theta))
    m.backbone.rms_norm_eps = hf_cfg.rms_norm_eps
    m.backbone.tie_word_embeddings = bool(hf_cfg.tie_word_embeddings)
    m.image.kind = "vq-features"
    m.image.path = None
    if image_size is not None:
        m.image.image_size = image_size
    elif not any(o.startswith("model.image.image_size=") for o in overrides):
        m.image.image_size = hf_cfg.vq_config.resolution
    if scale is not None:
        m.image.scale = scale
    m.in_proj = "soft-vq"
    if tau is not None:
        m.soft_vq_tau = tau
    m.tokenizer = "tokenizer"
    return cfg


def _check_tokenizer(tokenizer, hf_cfg) -> None:
    """The tokenizer and the weights must number the special and image tokens the same way."""
    for key, token in CHAMELEON_SPECIAL.items():
        if hf_cfg.vocabulary_map.get(token) != tokenizer._id(key):
            raise ValueError(
                f"{key} token {token!r} is id {tokenizer._id(key)} in the tokenizer but "
                f"{hf_cfg.vocabulary_map.get(token)} in the vocabulary map: tokenizer and weights differ"
            )
    if len(tokenizer) > hf_cfg.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {hf_cfg.vocab_size} embeddings")


def _image_embed_rows(tensors: dict[str, SourceTensor], hf_cfg, num_codes: int, src: Path):
    """The backbone's embedding rows of the image tokens, in code order (K, D), read row-sliced."""
    from omni.models.soft_vq import image_token_ids

    name = "model.embed_tokens.weight"
    if name not in tensors:
        raise ValueError(f"{src} has no {name}; is this a ChameleonForConditionalGeneration checkpoint?")
    ids = image_token_ids(hf_cfg.vocabulary_map, num_codes)
    lo, hi = int(ids.min()), int(ids.max()) + 1  # Chameleon: ids 4..8195 of 65536; read only those rows
    return load_source_tensor(tensors[name], rows=(lo, hi))[ids - lo].float()


def _weight_entries(model, tensors: dict[str, SourceTensor], hf_cfg, src: Path) -> dict[str, object]:
    """Output name -> source tensor (streamed) for the backbone, in-memory tensor for the new parts.

    Every backbone parameter must come from the source with the same shape, and every source
    tensor must be used (the VQGAN's go to vqgan/): a mismatch is a wrong or unsupported checkpoint.
    """
    entries: dict[str, object] = {}
    used = set()
    for name, t in model.state_dict().items():
        if not name.startswith("backbone."):
            entries[name] = t  # in_proj.*, head.*: built here
            continue
        key = name.removeprefix("backbone.")
        if key not in tensors:
            if key == "lm_head.weight" and hf_cfg.tie_word_embeddings:
                continue  # tied to the embeddings; the loader re-ties it
            raise ValueError(f"{src} has no tensor {key!r} that the Chameleon backbone needs")
        if tuple(tensors[key].shape) != tuple(t.shape):
            raise ValueError(f"{key}: shape {tensors[key].shape} in {src}, {tuple(t.shape)} in the model")
        entries[name] = tensors[key]
        used.add(key)
    left = sorted(k for k in tensors if k not in used and not k.startswith("model.vqmodel."))
    if left:
        raise ValueError(f"{src} holds tensors the backbone does not use: {left[:5]} ({len(left)} in all)")
    return entries


def convert_chameleon(
    src: str | Path,
    out: str | Path,
    *,
    vqgan: str | Path | None = None,
    preset: str = "orthus-stage1",
    overrides: list[str] | None = None,
    scale: float | None = None,
    tau: float | None = None,
    image_size: int | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Convert the HF Chameleon checkpoint directory `src` into an omni checkpoint at `out`.

    `vqgan` supplies the VQGAN decoder when `src` lacks it (transformers' checkpoints do);
    `preset` and `overrides` give the recipe stored with the checkpoint (head size, sampling).
    """
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, ChameleonConfig, ChameleonForConditionalGeneration

    from omni.models.attention import hf_attention
    from omni.models.checkpoint import check_checkpoint_out, save_pretrained
    from omni.models.model import OmniModel
    from omni.tokenizers.text import TextTokenizer
    from omni.tokenizers.vq import VQGAN, VQFeatureTokenizer

    src, out = Path(src), Path(out)
    check_checkpoint_out(out, force)  # before hours of conversion
    if not (src / "config.json").exists():
        raise FileNotFoundError(f"{src} is not a Hugging Face checkpoint directory (config.json missing)")
    hf_cfg = ChameleonConfig.from_pretrained(str(src))
    if hf_cfg.model_type != "chameleon" or not hf_cfg.vocabulary_map:
        raise ValueError(f"{src} holds a {hf_cfg.model_type!r} model without vocabulary map, not Chameleon")
    cfg = chameleon_model_config(hf_cfg, preset, overrides or [], scale, tau, image_size)
    tokenizer = TextTokenizer(AutoTokenizer.from_pretrained(str(src)), special=CHAMELEON_SPECIAL)
    _check_tokenizer(tokenizer, hf_cfg)

    tensors = source_tensors(src)
    vq = VQGAN(hf_cfg.vq_config)
    vq.load_weights(_vqgan_state(tensors, vqgan, set(vq.state_dict())), source=f"{src} (+ --vqgan {vqgan})")

    with torch.device("meta"):  # shapes and names only: the weights are streamed, never loaded
        backbone = ChameleonForConditionalGeneration._from_config(
            copy.deepcopy(hf_cfg), attn_implementation=hf_attention(cfg.model.backbone.attn_implementation)
        )
    model = OmniModel(cfg.model, tokenizer, VQFeatureTokenizer(cfg.model.image, vqgan=vq), backbone=backbone)
    rows = _image_embed_rows(tensors, hf_cfg, vq.config.num_embeddings, src)
    model.in_proj.image_embed = torch.nn.Parameter(rows)  # was a meta copy of the same rows
    entries = _weight_entries(model, tensors, hf_cfg, src)

    def write(path: Path) -> None:
        meta = {"format": "pt", "omni": "1", "source": "chameleon"}
        bar = tqdm(total=len(entries), desc="convert", unit="tensor", disable=not progress, file=sys.stderr)
        with bar:
            write_safetensors(path, entries, metadata=meta, progress=bar)

    return save_pretrained(model, out, config=cfg, write_weights=write, force=force)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a pretrained checkpoint into an omni checkpoint")
    sub = p.add_subparsers(dest="source", metavar="SOURCE", required=True)
    c = sub.add_parser(
        "chameleon",
        help="Chameleon / Anole / Lumina-mGPT (HF format) -> omni (Orthus: soft-VQ in, diffusion head out)",
        description="Convert a Hugging Face Chameleon checkpoint directory into an omni checkpoint whose "
        "images are VQGAN features (no quantization), embedded by soft VQ, drawn by a new diffusion head.",
    )
    c.add_argument(
        "--src", required=True, help="HF Chameleon directory (config.json, *.safetensors, tokenizer)"
    )
    c.add_argument("--out", required=True, help="output omni checkpoint directory")
    c.add_argument(
        "--vqgan",
        default=None,
        help="VQGAN weights with the decoder (.safetensors, or the release's vqgan.ckpt read as "
        "plain tensors); needed when --src lacks model.vqmodel.decoder.*",
    )
    c.add_argument(
        "--preset", default="orthus-stage1", help="recipe stored with the checkpoint (default %(default)s)"
    )
    c.add_argument("--scale", type=float, default=None, help="image token = feature x scale (Orthus: 0.1)")
    c.add_argument("--tau", type=float, default=None, help="soft-VQ temperature (Orthus: 1.0)")
    c.add_argument(
        "--image-size", type=int, default=None, help="pixels per side (default: the VQGAN's resolution)"
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.add_argument("--force", action="store_true",
                   help="replace --out even when it is not an omni checkpoint (its contents are deleted)")
    c.add_argument("overrides", nargs="*", help="config overrides, e.g. model.head.width=1024")
    c.set_defaults(func=run_chameleon)


def run_chameleon(args: argparse.Namespace) -> int:
    t0 = time.time()
    out = convert_chameleon(
        args.src,
        args.out,
        vqgan=args.vqgan,
        preset=args.preset,
        overrides=args.overrides,
        scale=args.scale,
        tau=args.tau,
        image_size=args.image_size,
        progress=not args.quiet,
        force=args.force,
    )
    size = (out / WEIGHTS).stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(
        f"wrote {out} ({size / 2**20:.1f} MiB of weights) in {time.time() - t0:.1f}s, peak RSS {peak:.0f} MiB"
    )
    return 0
