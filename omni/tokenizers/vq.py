"""`vq-features`: a Chameleon-style VQGAN used without its quantizer (the Orthus image tokens).

    encode: pixels (B, 3, H, W) --encoder--> (B, C_lat, h, w) --quant_conv--> z (B, d, h, w)
            tokens = (z - shift) * scale, one token per latent cell in raster order  (B, h*w, d)
    decode: z = tokens / scale + shift --post_quant_conv--> --decoder--> pixels

z is the feature *before* quantization, so an image never loses information to the codebook;
the codebook is still kept (`codebook`, `nearest_codes`) because the soft-VQ input embedding
(omni.models.soft_vq) is initialised from it and the hard VQ tokens are what a Chameleon model saw.

The encoder, quantizer and 1x1 convolutions are transformers' own Chameleon modules, so the
features match `ChameleonVQVAE` bit for bit. transformers ships no Chameleon VQGAN *decoder*
(Chameleon's release had no image generation), so `VQGANDecoder` is written here with the
parameter names of the original VQGAN checkpoint (`decoder.up.3.block.0.conv1.weight`, ...).

On disk (DIR/vqgan/ inside an omni checkpoint): config.json (a ChameleonVQVAEConfig) and
model.safetensors with keys encoder.*, quant_conv.*, quantize.embedding.weight,
post_quant_conv.*, decoder.*.

Shape legend: B images, C_lat latent channels, d codebook dim, K codebook size, h x w latent grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from omni.config import ImageTokenizerConfig
from omni.tokenizers.base import ImageTokenizer, weights_dir
from omni.utils import atomic_path, atomic_write_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _blocks():
    """transformers' Chameleon VQGAN building blocks (imported lazily: transformers is heavy)."""
    from transformers.models.chameleon import modeling_chameleon as mc

    return mc


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (the VQGAN decoder's upsampling step)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class VQGANDecoder(nn.Module):
    """Latents (B, C_lat, h, w) -> pixels in [-1, 1] (B, 3, h * 2^(L-1), w * 2^(L-1)).

    The mirror of transformers' ChameleonVQVAEEncoder: a middle block with attention, then per
    resolution (coarse to fine) num_res_blocks + 1 residual blocks and an upsampling step.
    """

    def __init__(self, config):
        super().__init__()
        mc = _blocks()
        mult = list(config.channel_multiplier)
        self.num_resolutions = len(mult)
        self.num_res_blocks = config.num_res_blocks
        attn_at = set(config.attn_resolutions or []) if config.attn_type == "vanilla" else set()
        block_in = config.base_channels * mult[-1]
        res = config.resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(config.latent_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = mc.ChameleonVQVAEEncoderResnetBlock(config, block_in, block_in)
        self.mid.attn_1 = (
            mc.ChameleonVQVAEEncoderAttnBlock(block_in) if config.attn_type == "vanilla" else nn.Identity()
        )
        self.mid.block_2 = mc.ChameleonVQVAEEncoderResnetBlock(config, block_in, block_in)

        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            up = nn.Module()
            up.block, up.attn = nn.ModuleList(), nn.ModuleList()
            block_out = config.base_channels * mult[level]
            for _ in range(self.num_res_blocks + 1):
                up.block.append(mc.ChameleonVQVAEEncoderResnetBlock(config, block_in, block_out))
                block_in = block_out
                if res in attn_at:
                    up.attn.append(mc.ChameleonVQVAEEncoderAttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                res *= 2
            self.up.insert(0, up)  # index by level, as the original checkpoint does

        self.norm_out = nn.GroupNorm(num_groups=32, num_channels=block_in, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(block_in, config.in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        h = self.norm_out(h)
        return self.conv_out(h * torch.sigmoid(h))


class VQGAN(nn.Module):
    """Chameleon's VQGAN: encoder, quant_conv, codebook, post_quant_conv, decoder."""

    def __init__(self, config):
        super().__init__()
        mc = _blocks()
        self.config = config
        self.encoder = mc.ChameleonVQVAEEncoder(config)
        self.quant_conv = nn.Conv2d(config.latent_channels, config.embed_dim, 1)
        self.quantize = mc.ChameleonVQVAEVectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.latent_channels, 1)
        self.decoder = VQGANDecoder(config)
        self.eval().requires_grad_(False)  # frozen: omni never trains the VQGAN

    @property
    def downsample(self) -> int:
        """Pixels per latent cell side."""
        return 2 ** (len(self.config.channel_multiplier) - 1)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] (B, 3, H, W) -> pre-quantization features z (B, d, h, w)."""
        return self.quant_conv(self.encoder(pixels))

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Codebook index of each feature vector, z (..., d) -> (...); the VQ tokens Chameleon sees."""
        flat = z.reshape(-1, z.shape[-1]).float()  # (M, d)
        book = self.quantize.embedding.weight.float()  # (K, d)
        # Same expansion as the quantizer, so ties break the same way.
        dist = flat.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * flat @ book.T  # (M, K)
        return dist.argmin(dim=1).reshape(z.shape[:-1])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Features z (B, d, h, w) -> pixels in about [-1, 1] (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(z))

    # persistence -----------------------------------------------------------------------------
    @classmethod
    def from_config_dict(cls, data: dict) -> VQGAN:
        from transformers import ChameleonVQVAEConfig

        data = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
        return cls(ChameleonVQVAEConfig(**data))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VQGAN:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise FileNotFoundError(
                f"no VQGAN at {str(path)!r} (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                "create one with `omni convert chameleon --src HF_DIR --out DIR`"
            )
        model = cls.from_config_dict(json.loads((path / CONFIG_FILE).read_text()))
        model.load_weights(load_file(str(path / WEIGHTS_FILE)), source=str(path / WEIGHTS_FILE))
        return model

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load that names what is missing, e.g. the decoder of a transformers checkpoint."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            hint = ""
            if any(k.startswith("decoder.") for k in missing):
                hint = (
                    "; the VQGAN decoder is missing (transformers' Chameleon checkpoints drop it): pass "
                    "the original VQGAN weights, e.g. `omni convert chameleon --vqgan tokenizer/vqgan.ckpt`"
                )
            raise ValueError(
                f"{source} does not match the VQGAN config: missing {sorted(missing)[:4]} "
                f"({len(missing)} in all), unexpected {sorted(unexpected)[:4]}{hint}"
            )

    def save_pretrained(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / CONFIG_FILE, self.config.to_json_string())
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})


class VQFeatureTokenizer(ImageTokenizer):
    """Continuous image tokens = a VQGAN's pre-quantization features, scaled (Orthus: x0.1).

    One token per latent cell (`patch_size` is not used): the soft-VQ embedding looks every
    token up in the codebook, so tokens must stay codebook-sized. A 512 px image through
    Chameleon's VQGAN gives 32 x 32 tokens of dimension 256.
    """

    def __init__(self, cfg: ImageTokenizerConfig, vqgan: VQGAN | None = None, root: str | Path | None = None):
        self.cfg = cfg
        if vqgan is None:
            path = weights_dir(cfg, root, "a VQGAN directory (made by `omni convert chameleon`)")
            vqgan = VQGAN.from_pretrained(path)
        self.vqgan = vqgan
        self.multiple = vqgan.downsample
        if cfg.scale <= 0:
            raise ValueError(f"model.image.scale={cfg.scale} must be positive (Orthus uses 0.1)")

    @property
    def token_dim(self) -> int:
        return self.vqgan.config.embed_dim

    @property
    def codebook(self) -> torch.Tensor:
        """The VQ codebook (K, d), in feature units (not scaled)."""
        return self.vqgan.quantize.embedding.weight

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    def to(self, device) -> VQFeatureTokenizer:
        self.vqgan.to(device)
        return self

    def features_to_tokens(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d, h, w) features -> (B, h*w, d) tokens."""
        return rearrange((z - self.cfg.shift) * self.cfg.scale, "b d h w -> b (h w) d")

    def tokens_to_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w, d) tokens -> (B, d, h, w) features."""
        rows, cols = self.grid
        z = tokens.float() / self.cfg.scale + self.cfg.shift
        return rearrange(z, "b (h w) d -> b d h w", h=rows, w=cols)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.to(self.device).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1], as Chameleon's processor
        return self.features_to_tokens(self.vqgan.features(pixels))  # (B, N, d)

    def _decode(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.vqgan.decode(self.tokens_to_features(tokens).to(self.device))  # (B, 3, H, W)
        return ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).cpu()

    @torch.no_grad()
    def nearest_codes(self, tokens: torch.Tensor) -> torch.Tensor:
        """Hard VQ codes of tokens (B, N, d) -> (B, N): what Chameleon would have embedded."""
        return self.vqgan.nearest_codes(tokens.float().to(self.device) / self.cfg.scale + self.cfg.shift)

    def save_pretrained(self, path: str | Path) -> None:
        self.vqgan.save_pretrained(Path(path) / "vqgan")
