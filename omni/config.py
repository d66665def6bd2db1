"""Typed configs: nested dataclasses whose defaults are the `tiny` recipe.

A run is described by one `Config`. It is built from a preset name (`tiny`) or a YAML file,
then dotted command-line overrides (`train.lr=3e-4 model.head.width=512`). Unknown keys and
values of the wrong type are errors that name the key and the closest valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import types
import typing
from dataclasses import dataclass, field
from math import isqrt
from pathlib import Path
from typing import Any, Literal, Union

import yaml

# Presets ship inside the package (package data), so a wheel or `pip install .` has them too.
CONFIG_DIR = Path(str(importlib.resources.files("omni") / "configs"))
MODES = ("auto", "text", "image")  # generation modes: interleaved, text only, exactly one image
SAMPLERS = ("ddim", "ddpm", "euler", "stochastic")  # image-token samplers (omni.heads.diffusion)


class ConfigError(ValueError):
    """A config key or value that does not fit the schema."""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    arch: Literal["llama", "qwen2", "chameleon"] = "llama"  # HF decoder (chameleon: via omni convert)
    pretrained: str | None = None  # local HF model directory; None builds from the fields below
    hidden_size: int = 256  # model width
    num_layers: int = 4  # decoder layers
    num_heads: int = 4  # attention heads
    num_kv_heads: int | None = None  # grouped-query heads; None = num_heads
    intermediate_size: int = 704  # MLP width
    max_position_embeddings: int = 512  # context length
    rope_theta: float = 10000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # share input embedding and LM head
    # attention kernel, which also sets how packed rows keep documents apart (omni/models/attention.py):
    # sdpa (dense mask; fp32 under CPU bf16 autocast), eager (dense mask), flex_attention (BlockMask;
    # GPU training, CPU forward only), flash_attention_2 (varlen lengths, causal only; needs flash-attn),
    # grouped (each document of a packed row on its own, similar lengths batched: CPU training; sdpa elsewhere)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention", "grouped"] = "sdpa"


@dataclass
class ImageTokenizerConfig:
    kind: Literal["patch", "patch-ae", "vae", "vq-features"] = "patch"  # how pixels become continuous tokens
    image_size: int = 32  # square input/output resolution in pixels
    patch_size: int = 8  # pixels per patch side (patch) or latent cells per token side (vae)
    channels: int = 3  # image channels
    path: str | None = None  # local directory of the autoencoder / VAE / VQGAN weights (patch-ae, vae, vq-features)
    scale: float = 1.0  # latents are multiplied by this before becoming tokens (MAR KL-16: 0.2325)
    shift: float = 0.0  # subtracted from latents before scaling
    # The order of an image's tokens in the sequence (they are read and drawn in it): raster, or
    # blocks: the `block` x `block` blocks of neighbouring tokens in raster order of blocks, raster
    # within each (the shapes world at 32 px, block 2: one object cell after another, each drawn
    # whole before the next starts). The tokenizer's encode / decode apply it (omni/tokenizers/base.py).
    order: Literal["raster", "blocks"] = "raster"
    block: int = 2  # tokens per block side for order=blocks

    def __post_init__(self) -> None:
        if self.order not in ("raster", "blocks"):
            raise ConfigError(f"model.image.order={self.order!r}: use raster or blocks")
        if self.block < 1:
            raise ConfigError(f"model.image.block={self.block}: use a block side of at least 1 token")


@dataclass
class DiffusionHeadConfig:
    width: int = 256  # MLP width of the denoiser
    depth: int = 3  # residual AdaLN blocks
    parameterization: Literal["v", "eps", "flow"] = "flow"  # what the head predicts
    schedule: Literal["cosine", "scaled_linear", "linear"] = "scaled_linear"  # beta schedule (v/eps)
    beta_start: float = 0.00085  # scaled-linear start (Orthus)
    beta_end: float = 0.012  # scaled-linear end (Orthus)
    zero_terminal_snr: bool = True  # rescale betas so the last step is pure noise
    train_steps: int = 1000  # diffusion timesteps for v/eps
    noise_copies: int = 4  # noisy copies of each token per step (MAR's diffusion_batch_mul)
    grad_checkpointing: bool = False  # recompute head activations in backward
    # Train the head's matmuls in bf16 when the run uses bf16 autocast (noise, targets, loss and
    # sampling stay fp32). Off: the head trains wholly in fp32. bf16 has fp32's range, so MAR's
    # fp16 NaNs do not apply; on the tiny preset the head is most of a CPU step and runs 2x faster.
    bf16_train: bool = False
    # torch.compile the training loss (noise and timesteps stay eager): inductor fuses the adaLN
    # blocks' LayerNorm / modulate / SiLU / gate into a few kernels. Costs a compile on first use.
    compile: bool = False
    # Parallel image decoding (model.parallel_image): the tokens of a group are denoised together,
    # each still from its own query's condition: every block first lets a group's tokens attend to
    # each other (one attention over the group, zero-initialised output), and training noises a
    # group at one timestep. Without it a group's tokens are drawn independently given the context.
    group_attention: bool = False
    # Width of that attention's queries, keys and values (heads of 64): 0 = the head's width. Its
    # projections cost 4 x dim x width per token and block against the MLP's 2 x width^2, so a
    # narrow one (64) is cheap; the output projection maps back to the width.
    group_attention_dim: int = 0
    # How the timestep reaches the adaLN modulations. 0: MAR's net, modulations of (time + condition)
    # embeddings, each computed once per noisy row: per noise copy in training, per denoising step
    # and stream in sampling (most of the head's matmuls). N > 0: the condition's modulations
    # computed once per token plus those of an N-wide time embedding (docs/performance.md, "The
    # head's own time path"): ~0.63x the head's training FLOPs, and a sampling step is its MLPs.
    time_width: int = 0


@dataclass
class ModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    image: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    head: DiffusionHeadConfig = field(default_factory=DiffusionHeadConfig)
    tokenizer: str | None = None  # local directory of the text tokenizer
    in_proj: Literal["linear", "soft-vq"] = "linear"  # image token -> embedding
    soft_vq_tau: float = 1.0  # temperature of the soft-VQ lookup
    # A learned embedding per grid cell (0 .. image tokens - 1) added to each image token's input:
    # where a patch sits in its image, which 1-D RoPE only tells relative to every other position.
    image_pos_embed: bool = False
    # Gaussian noise of this spread added, in training, to the tokens of drawn images (diffusion
    # targets) as the backbone reads them (the targets stay clean), so it reads its own approximate
    # samples at generation time as it read training images; prompt images stay clean. Tokens of
    # patch-ae and scaled VAE latents have unit spread. 0 = off.
    image_input_noise: float = 0.0
    # How the positions of a prompt image (one the document gives, not one the model draws) see
    # each other: "causal" in raster order like every other position, or "bidirectional": each
    # token of the image sees the whole image, so a patch knows the object it is part of (as a ViT
    # encoder would give). Drawn images stay causal: they are generated token by token.
    prompt_image_attention: Literal["causal", "bidirectional"] = "causal"
    # Condition each drawn image token also on the token at the same cell of the previous image of
    # its document (the picture an edit changes, a story's last frame): a learned projection of it
    # is added to the diffusion head's conditioning vector, as InstructPix2Pix hands its denoiser
    # the source latents. Zero-initialised; the first image of a document has no reference. One
    # image token per pass only (not with model.parallel_image). docs/editing.md.
    image_reference: bool = False
    # Weight of the diffusion loss of a drawn image token that differs from the token at the same
    # cell of the previous picture of its document (what an edit or a story step changes), against
    # 1 for every other image token; the image loss stays a weighted mean. An edit copies most of
    # its source, so without it the few changed cells, the edit itself, are a small share of the
    # loss. A token counts as changed when a value differs by more than 1e-3 (exact for the patch
    # tokenizer; an encoder with a wide receptive field marks the change's surroundings too).
    # 1 = off. One image token per pass only (not with model.parallel_image). docs/editing.md.
    image_change_weight: float = 1.0
    loss_weight_text: float = 1.0  # weight of the LM loss
    loss_weight_image: float = 1.0  # weight of the diffusion loss
    # Parallel image decoding (docs/parallel.md): "off" draws one image token per backbone pass from
    # the position before it; group sizes ("4", or a schedule "1,2,4,8" whose last size repeats)
    # draw each group of tokens in one pass, every token from its own position query (a learned
    # per-cell input that sees the committed tokens before its group and is seen by nothing).
    # Alternatives joined by "|" ("4|1|2|8") train one model for all of them: each drawn image of
    # training takes one, picked by its content (`layout`); the model draws with the first unless
    # generation.parallel_image names another, so one run gives the curve over k.
    parallel_image: str = "off"
    # The order the groups take the cells in: "raster" (groups are runs of a row), "strided" (each
    # group a lattice of cells sqrt(k) apart in both directions, as PAR draws distant tokens
    # together, so no two tokens of a group touch) or "blocks" (each group a sqrt(k) x sqrt(k)
    # block of neighbouring cells, blocks in raster order: what one object covers is drawn in one
    # pass, best with model.head.group_attention). The last two need one group size k, a square
    # whose root divides the grid side (or alternatives of such sizes, "4|1|16": each drawn image's
    # order follows its own k; k = 1 and k = the whole grid are the raster order). Committed tokens
    # then sit in the sequence in drawing order, each with its raster position id.
    parallel_order: Literal["raster", "strided", "blocks"] = "raster"

    def __post_init__(self) -> None:
        choices = parse_group_choices(self.parallel_image, "model.parallel_image")
        if self.image_reference and choices is not None:
            raise ConfigError(f"model.image_reference=true conditions one image token per pass on its cell of the "
                              f"previous picture; it does not work with model.parallel_image={self.parallel_image!r} "
                              "yet: turn one of them off")
        if not self.image_change_weight > 0:
            raise ConfigError(f"model.image_change_weight={self.image_change_weight} must be > 0 (1 = every image "
                              "token weighs the same)")
        if self.image_change_weight != 1.0 and choices is not None:
            raise ConfigError(f"model.image_change_weight={self.image_change_weight} weighs tokens by their cell of the "
                              f"previous picture, which the layout of model.parallel_image={self.parallel_image!r} "
                              "does not record: set it to 1 or turn parallel decoding off")
        if self.head.time_width < 0:
            raise ConfigError(f"model.head.time_width={self.head.time_width}: use 0 (MAR's modulations of time + "
                              "condition) or a width > 0 for the head's own time path (e.g. 64)")
        if self.head.group_attention and choices is None:
            raise ConfigError("model.head.group_attention=true denoises a group of image tokens together, so it "
                              "needs model.parallel_image (e.g. 4); set one or leave group_attention off")
        if self.parallel_order != "raster" and (choices is None or any(
                len(c) != 1 or isqrt(c[0]) ** 2 != c[0] for c in choices)):
            raise ConfigError(f"model.parallel_order={self.parallel_order} needs model.parallel_image to be one square "
                              f"group size (4, 9, 16, ...) or alternatives of such sizes (\"4|1|16\"), got "
                              f"{self.parallel_image!r}")
        if self.parallel_order != "raster" and self.image.order != "raster":
            raise ConfigError(f"model.parallel_order={self.parallel_order} reorders an image's cells itself; it needs "
                              f"model.image.order=raster, got {self.image.order!r}")


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard paths, brace patterns or pipe: URLs
    val: list[str] = field(default_factory=list)  # held-out shards for validation loss
    seq_len: int = 160  # packed row length in tokens
    batch_size: int = 32  # rows per micro-batch per rank
    num_workers: int = 0  # loader worker processes per rank
    shuffle_buffer: int = 1000  # samples held for shuffling
    resampled: bool = True  # stream shards with replacement (multi-epoch)
    pack: bool = True  # pack several documents into one row
    # Documents that fit no row of the batch wait for the next one while up to this many more are
    # tried in the gaps (0: a document that fits nowhere closes the batch); at most batch_size - 1
    pack_lookahead: int = 0
    cfg_drop: float = 0.1  # prob. of replacing a text-to-image caption by the empty condition
    edit_drop_text: float = 0.05  # prob. an edit doc drops its instruction, keeps its image (InstructPix2Pix)
    edit_drop_both: float = 0.05  # prob. it drops instruction and image: t2i's null form (InstructPix2Pix)
    task_weights: dict[str, float] = field(default_factory=dict)  # task name -> sampling weight
    max_warnings: int = 20  # bad-sample warnings printed per reason before going quiet


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, through peft) on the backbone's linear layers: `rank` 0 = off. With
    adapters the backbone's own weights stay frozen; `train.trainable` then says which other weights
    train beside them (`all`: every weight outside the backbone, i.e. the image in-projection, the
    diffusion head and the image embeddings; `new`: those and the new token rows; or name globs).
    `omni export` merges the adapters into the weights, so the exported model is a plain one."""

    rank: int = 0  # adapter rank r; 0 = no adapters
    alpha: float = 16.0  # scale alpha / r on the adapter's update
    dropout: float = 0.0  # dropout on the adapter's input
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module names (Llama/Qwen2/Chameleon)


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"  # run directory: checkpoints, logs, exports
    steps: int = 2000  # optimizer steps
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 50  # linear warmup
    weight_decay: float = 0.05  # AdamW decay (not on norms, biases, embeddings)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # global norm clip; 0 disables
    grad_accum: int = 1  # micro-batches per optimizer step
    global_batch_size: int | None = None  # rows per optimizer step over all ranks; sets grad_accum
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    offload: bool = False  # ZeRO optimizer offload to CPU
    offload_params: bool = False  # ZeRO-3 parameter offload to CPU
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where the hardware has it
    # How bf16 is applied: "autocast" (fp32 weights, bf16 matmuls in the forward) or "deepspeed"
    # (DeepSpeed's bf16 mode: bf16 weights and gradients, fp32 master weights in the optimizer;
    # halves ZeRO-3 all-gather bytes; the diffusion head still computes in fp32 unless bf16_train)
    bf16_mode: Literal["autocast", "deepspeed"] = "autocast"
    tf32: bool = False  # CUDA: let fp32 matmuls (the fp32 diffusion head, the LM loss) use TF32 tensor cores
    # Fused Liger kernels in the backbone (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy), GPU
    # only; needs the liger-kernel package (pip install -e .[gpu])
    liger: bool = False
    # torch.compile each backbone decoder layer for training (inductor fuses RMSNorm, RoPE, SwiGLU
    # and the casts around attention): the demo's CPU step at 0.79x of eager, 0.68x with
    # model.head.compile (benchmarks/bench_compile.py). The first steps pay the compile (~10-40 s
    # on 2 cores; cached on disk after). Inference stays eager. Not with ZeRO-3.
    compile: bool = False
    activation_checkpointing: bool = False  # recompute backbone activations in backward
    ema_decay: float = 0.0  # EMA of weights; 0 disables
    trainable: Literal["all", "new"] | list[str] = "all"  # new: in_proj/head/new rows; or name globs
    lora: LoraConfig = field(default_factory=LoraConfig)  # adapters on the backbone (rank 0 = off)
    deepspeed_config: str | None = None  # user DeepSpeed JSON merged over the generated one
    seed: int = 0  # base seed; rank r uses seed + r
    save_every: int = 500  # checkpoint interval in steps
    keep_last: int = 2  # checkpoints kept
    # false: a checkpoint leaves out the frozen weights that train.init_from holds (LoRA's base, a
    # `train.trainable` subset's rest), recording a fingerprint of that checkpoint's files; resume
    # and export read them back from there. true: every checkpoint holds every weight.
    save_frozen: bool = False
    log_every: int = 10  # console/TensorBoard interval
    val_every: int = 250  # validation interval; 0 disables
    val_batches: int = 4  # batches per validation
    max_bad_steps: int = 5  # consecutive non-finite losses before stopping
    resume: str | None = None  # "auto": continue from out_dir's latest checkpoint; or a checkpoint tag dir
    init_from: str | None = None  # omni checkpoint dir (omni convert / omni export) whose weights start the run


@dataclass
class GenerationConfig:
    mode: Literal[MODES] = "auto"  # free interleaved, text only, image only
    max_new_tokens: int = 64  # generated positions (text + image) per answer
    max_images: int = 4  # images per answer
    temperature: float = 0.0  # text sampling temperature (0 = greedy)
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # nucleus sampling
    repetition_stop: int = 0  # stop a row after this many identical text tokens in a row; 0 off
    sampler: Literal[SAMPLERS] = "stochastic"  # image token sampler
    image_steps: int = 20  # denoising steps per image token (with image_steps_schedule "constant")
    # Steps by token (DiSA, arXiv 2505.20297: later tokens are pinned down by their context and need
    # fewer): "constant" (image_steps for every token) or "anneal:START:END[:LEVELS]" (START at the
    # first token, linearly to END at the last; LEVELS plateaus bound the CUDA graphs to capture).
    image_steps_schedule: str = "constant"
    image_temperature: float = 0.7  # noise scale of the image sampler
    cfg_scale: float = 3.0  # classifier-free guidance on image tokens; 1 disables
    # Image-guided CFG for edits (InstructPix2Pix; docs/editing.md): the image scale of
    # u + s_img (i - u) + cfg_scale (c - i), i the stream that sees the context's pictures but no
    # text. None: s_img = cfg_scale, which needs no i stream (plain CFG, the behaviour before it).
    image_cfg_scale: float | None = None
    seed: int = 0  # generation seed
    use_cache: bool = True  # KV cache (False recomputes the prefix every step)
    # Preallocated KV cache written in place (omni/models/kv_cache.py): fixed shapes between row
    # joins/leaves, so an image-token step can be replayed from a CUDA graph; same tokens as dynamic.
    static_cache: bool = False
    cuda_graphs: bool = False  # replay each image token's diffusion loop from a CUDA graph (CUDA only)
    head_dtype: Literal["float32", "bfloat16"] = "float32"  # diffusion head matmuls when sampling
    # Image tokens per backbone pass of a model trained with model.parallel_image: None = the
    # groups it was trained with; another schedule ("2", "1,2,4") draws with those groups instead.
    parallel_image: str | None = None

    def __post_init__(self) -> None:
        parse_steps_schedule(self.image_steps_schedule)
        if self.parallel_image is not None:
            parse_groups(self.parallel_image, "generation.parallel_image")


def parse_groups(spec: str, name: str = "model.parallel_image") -> list[int] | None:
    """A parallel-image schedule -> None ("off") or its group sizes (the last one repeats)."""
    if spec == "off":
        return None
    parts = [p.strip() for p in str(spec).split(",")]
    if parts and all(p.isdigit() and int(p) >= 1 for p in parts):
        return [int(p) for p in parts]
    raise ConfigError(
        f"{name}={spec!r}: use \"off\" or image tokens per backbone pass, one size (\"4\") or a "
        "schedule whose last size repeats (\"1,2,4,8\"), each >= 1"
        + (", or alternatives to train together joined by \"|\" (\"4|1|2|8\")" if name.startswith("model.") else "")
    )


def parse_group_choices(spec: str, name: str = "model.parallel_image") -> list[list[int]] | None:
    """model.parallel_image -> None ("off") or its schedules: one, or alternatives joined by "|"
    ("4|1|2|8"), each drawn image of training taking one of them; the first is the model's own."""
    if spec == "off":
        return None
    choices = [parse_groups(part, name) for part in str(spec).split("|")]
    if any(c is None for c in choices):
        raise ConfigError(f"{name}={spec!r}: \"off\" cannot be one of several alternatives")
    return choices


def draw_order(total: int, spec: list[int], order: str = "raster") -> list[int]:
    """The cells of a `total`-token image in the order parallel decoding draws them (groups are
    consecutive runs of it, `group_sizes`): raster; strided (one group size k = r * r: the
    cells (i + s a, j + s b), a, b < r, with s = side / r, one offset (i, j) per group); blocks (one
    group size k = r * r: the r x r blocks of neighbouring cells, in raster order of blocks)."""
    if order == "raster":
        return list(range(total))
    side, r = isqrt(total), isqrt(spec[0])
    if side * side != total or r * r != spec[0] or side % r:
        raise ValueError(f"a {order} drawing order needs a square grid whose side is divisible by sqrt(k): "
                         f"{total} tokens with groups of {spec[0]}; use model.parallel_order=raster")
    if order == "blocks":
        return sorted(range(total), key=lambda c: ((c // side) // r, (c % side) // r, c // side, c % side))
    s = side // r
    return sorted(range(total), key=lambda c: ((c // side) % s, (c % side) % s, c // side, c % side))


def group_sizes(spec: list[int], total: int) -> list[int]:
    """Group sizes covering `total` image tokens: the schedule, its last size repeated, the last
    group cut to fit. [1, 2, 4] over 16 tokens -> [1, 2, 4, 4, 4, 1]."""
    sizes, done, i = [], 0, 0
    while done < total:
        k = min(spec[min(i, len(spec) - 1)], total - done)
        sizes.append(k)
        done, i = done + k, i + 1
    return sizes


def parse_steps_schedule(spec: str) -> tuple[int, int, int] | None:
    """`generation.image_steps_schedule` -> None ("constant") or (START, END, LEVELS); LEVELS 0
    means a separate step count for every token."""
    if spec == "constant":
        return None
    parts = spec.split(":")
    numbers = parts[1:]
    if parts[0] == "anneal" and len(numbers) in (2, 3) and all(n.isdigit() for n in numbers):
        start, end, levels = int(numbers[0]), int(numbers[1]), int(numbers[2]) if len(numbers) == 3 else 0
        if start >= 1 and end >= 1 and (len(numbers) == 2 or levels >= 2):
            return start, end, levels
    raise ConfigError(
        f"generation.image_steps_schedule={spec!r}: use \"constant\" or \"anneal:START:END[:LEVELS]\" with "
        "START, END >= 1 steps and LEVELS >= 2 plateaus, e.g. anneal:50:10 or anneal:50:10:5"
    )


def steps_for_token(cfg: GenerationConfig, index: int, total: int) -> int:
    """Denoising steps for image token `index` (0-based) of `total` under cfg's schedule."""
    plan = parse_steps_schedule(cfg.image_steps_schedule)
    if plan is None:
        return cfg.image_steps
    if not 0 <= index < total:
        raise ValueError(f"image token index {index} is outside 0..{total - 1}")
    start, end, levels = plan
    if levels:  # plateau k of LEVELS holds tokens [k total / LEVELS, (k + 1) total / LEVELS)
        frac = min(index * levels // total, levels - 1) / (levels - 1)
    else:
        frac = index / (total - 1) if total > 1 else 0.0
    return round(start + (end - start) * frac)


@dataclass
class Config:
    name: str = "tiny"  # recipe name
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        from omni.utils import atomic_write_text

        atomic_write_text(path, self.to_yaml())


# --------------------------------------------------------------------------------------------
# Building from dicts, YAML, presets and overrides
# --------------------------------------------------------------------------------------------


def _to_plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; convert the lossless cases (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            if isinstance(value, str):  # a single shard path given on the command line
                value = [value]
            else:
                raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if key.rsplit(".", 1)[-1] in COUNT_STRINGS and isinstance(value, int):
            # YAML reads `parallel_image: 4` (one group size) as an integer and `off` as false
            value = "off" if value is False else str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    raise ConfigError(f"{key}: unsupported type {tp}")


COUNT_STRINGS = ("parallel_image",)  # string fields whose plain values are numbers ("4" or "1,2,4")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` checked against the field annotation `tp` (the public face of the config's type rules)."""
    return _coerce(value, tp, key)


def _unknown_key(prefix: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {prefix + name!r}{hint} (valid: {', '.join(valid)})")


def _build(cls: type, data: dict[str, Any], prefix: str = "", base: Any = None) -> Any:
    """Instantiate dataclass `cls` from `data`, starting from `base` (or the defaults)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    obj = base if base is not None else cls()
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(prefix, k, names)
        tp = hints[k]
        current = getattr(obj, k)
        if dataclasses.is_dataclass(tp) and isinstance(v, dict):
            v = _build(tp, v, prefix=f"{prefix}{k}.", base=current)
        else:
            v = _coerce(v, tp, prefix + k)
        setattr(obj, k, v)
    check = getattr(obj, "__post_init__", None)
    if check is not None:  # field checks that types alone cannot express
        check()
    return obj


def from_dict(data: dict[str, Any], base: Config | None = None) -> Config:
    return _build(Config, data, base=base)


def presets() -> dict[str, Path]:
    """The preset registry: every YAML file in `configs/`, by stem."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}:{where} is not valid YAML ({problem}); fix the file or pass another --config") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def _resolve_file(spec: str | Path) -> dict[str, Any]:
    """Read a preset or YAML file; a `base:` key names a preset or file to start from."""
    path = Path(spec)
    if not path.exists():
        table = presets()
        if str(spec) not in table:
            close = difflib.get_close_matches(str(spec), list(table), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"config {str(spec)!r} is neither a file nor a preset.{hint} Presets: {', '.join(table)}"
            )
        path = table[str(spec)]
    data = _read_yaml(path)
    parent = data.pop("base", None)
    if parent is None:
        return data
    merged = _resolve_file(parent if Path(parent).exists() else str(parent))
    return _deep_merge(merged, data)


class _Whole(dict):
    """A mapping given whole on the command line (`data.task_weights={t2i: 1.0}`): it replaces."""


def _section_type(tp: Any) -> type | None:
    """The dataclass a field holds (through `X | None`), or None for plain values and mappings."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def _deep_merge(a: dict[str, Any], b: dict[str, Any], cls: type | None = Config, whole: bool = True) -> dict[str, Any]:
    """`b` over `a`. Config sections (dataclasses) merge field by field; a mapping-valued field
    (`data.task_weights`) is replaced by `b`'s mapping, so `{t2i: 1.0}` and `{}` mean exactly that.
    With `whole=False` (dotted overrides) only mappings given whole replace: `data.task_weights.vqa=0.5`
    sets one entry."""
    hints = typing.get_type_hints(cls) if cls is not None else {}
    out = dict(a)
    for k, v in b.items():
        section = _section_type(hints.get(k)) if cls is not None else None
        merge = isinstance(v, dict) and isinstance(out.get(k), dict)
        if merge and (section is not None or (cls is None and not whole)
                      or (k in hints and not whole and not isinstance(v, _Whole))):
            out[k] = _deep_merge(out[k], v, section, whole)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.lr=3e-4", "data.train=[a.tar,b.tar]"]` -> nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML; quote it or fix the brackets "
                              "(e.g. data.train=[a.tar,b.tar])") from None
        if isinstance(value, dict):
            value = _Whole(value)
        if isinstance(value, str) and raw.strip().lower() in ("none", "null", "~"):
            value = None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def load_config(spec: str | Path | None = "tiny", overrides: list[str] | None = None) -> Config:
    """Build a Config from a preset name or YAML path, then apply dotted overrides."""
    data = _resolve_file(spec) if spec is not None else {}
    data = _deep_merge(data, parse_overrides(overrides or []), whole=False)
    return from_dict(data)
