"""Soft-VQ input embedding: a continuous image token -> a backbone input vector (Orthus).

A discrete-token model such as Chameleon embeds image code k with the embedding row of the BPE
token that stands for k. For a continuous feature x, Orthus replaces the hard lookup by a soft one:

    w = softmax(-||x - c_k||^2 / tau)  over the K codebook entries c_k     (M, K)
    embedding = w @ E_img                                                   (M, D)

where `codebook_in` (c) starts as a copy of the VQ codebook and `image_embed` (E_img) as the
backbone's embedding rows of the image tokens, in codebook order. As tau -> 0, w becomes the
one-hot of the nearest code and the embedding is exactly what the discrete model saw, so the
converted model starts where the original one was; tau = 1 (Orthus' choice) lets gradients reach
every entry.

`image_embed` is a copy, not a view of the backbone's embedding table: the first Orthus stage
trains it (optionally) with the backbone frozen, and ZeRO shards it like any other parameter.
The backbone rows of the image tokens are never read again (image positions carry the `<image>`
placeholder), and their logits are suppressed (omni.models.backbone.prepare_chameleon_backbone).

Shape legend: M image tokens, K codebook size, d codebook dim, D backbone width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_TOKEN_PREFIX = "IMGIMG"  # Chameleon names code 123 "IMGIMGBCDZ": digits as letters A-J, then Z


def code_of_token_name(name: str) -> int:
    """Chameleon's image-token name -> VQ code (`IMGIMGBCDZ` -> 123)."""
    digits = name[len(IMAGE_TOKEN_PREFIX) : -1]
    if not digits or any(not "A" <= c <= "J" for c in digits):
        raise ValueError(
            f"{name!r} is not a Chameleon image token name (IMGIMG + letters A-J + one more char)"
        )
    return int("".join(str(ord(c) - ord("A")) for c in digits))


def token_name_of_code(code: int) -> str:
    """VQ code -> Chameleon's image-token name (123 -> `IMGIMGBCDZ`)."""
    return IMAGE_TOKEN_PREFIX + "".join(chr(ord("A") + int(c)) for c in str(code)) + "Z"


def image_token_ids(vocabulary_map: dict[str, int], num_codes: int) -> torch.Tensor:
    """Vocabulary id of the token for every code 0..K-1 (K,), from a Chameleon vocabulary map."""
    by_code: dict[int, int] = {}
    for name, token_id in vocabulary_map.items():
        if name.startswith(IMAGE_TOKEN_PREFIX):
            by_code[code_of_token_name(name)] = int(token_id)
    missing = [k for k in range(num_codes) if k not in by_code]
    if missing:
        raise ValueError(
            f"the vocabulary map has no image token for codes {missing[:5]} ({len(missing)} of {num_codes}); "
            "is the VQGAN codebook size (vq_config.num_embeddings) right for this checkpoint?"
        )
    return torch.tensor([by_code[k] for k in range(num_codes)], dtype=torch.long)


class SoftVQEmbedding(nn.Module):
    """embed(tokens (M, d)) = softmax(-||tokens / scale + shift - codebook_in||^2 / tau) @ image_embed."""

    def __init__(
        self,
        codebook: torch.Tensor,
        image_embed: torch.Tensor,
        tau: float = 1.0,
        scale: float = 1.0,
        shift: float = 0.0,
    ):
        super().__init__()
        if tau <= 0:
            raise ValueError(f"model.soft_vq_tau={tau} must be positive (Orthus uses 1.0)")
        if codebook.shape[0] != image_embed.shape[0]:
            raise ValueError(
                f"codebook has {codebook.shape[0]} entries but image_embed has {image_embed.shape[0]} rows"
            )
        self.codebook_in = nn.Parameter(codebook.detach().clone().float())  # (K, d)
        self.image_embed = nn.Parameter(image_embed.detach().clone().float())  # (K, D)
        self.tau = tau
        self.scale = scale  # tokens are (feature - shift) * scale; distances are taken in feature units
        self.shift = shift

    @classmethod
    def from_model(cls, model, token_dim: int) -> SoftVQEmbedding:
        """Build for an OmniModel whose image tokenizer has a codebook (kind vq-features).

        A backbone with a Chameleon vocabulary map gives the initial image embeddings (its rows of
        the image tokens, in code order); any other backbone starts them at random (std 0.02).
        """
        tok = model.image_tokenizer
        codebook = getattr(tok, "codebook", None)
        if codebook is None:
            raise ValueError(
                "model.in_proj=soft-vq needs an image tokenizer with a codebook "
                f"(model.image.kind=vq-features), got kind {model.cfg.image.kind!r}; use model.in_proj=linear"
            )
        if codebook.shape[1] != token_dim:
            raise ValueError(f"codebook dim {codebook.shape[1]} != image token dim {token_dim}")
        table = model.backbone.get_input_embeddings().weight  # (V, D)
        vocab_map = getattr(model.backbone.config, "vocabulary_map", None)
        if hasattr(table, "ds_id"):
            # ZeRO-3 partition (this rank holds a slice, its shape is (0,)): the model is being
            # built for train.init_from, whose checkpoint holds in_proj.image_embed; load fills it.
            rows = torch.zeros(codebook.shape[0], table.ds_shape[1])
        elif vocab_map:
            ids = image_token_ids(vocab_map, codebook.shape[0])
            rows = table[ids.to(table.device)]  # (K, D), meta while a checkpoint is being converted
        else:
            rows = torch.randn(codebook.shape[0], table.shape[1], device=table.device) * 0.02
        image_cfg = model.cfg.image
        return cls(codebook, rows, tau=model.cfg.soft_vq_tau, scale=image_cfg.scale, shift=image_cfg.shift)

    def extra_repr(self) -> str:
        k, d = self.codebook_in.shape
        return f"codes={k}, dim={d}, width={self.image_embed.shape[1]}, tau={self.tau}, scale={self.scale}"

    def weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """Soft assignment of tokens (M, d) to the codebook -> (M, K), rows sum to 1.

        Always fp32, also under bf16 autocast: squared distances of features of norm ~10 lose
        whole units in bf16, which at tau = 1 reorders the weights.
        """
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            x = tokens.float() / self.scale + self.shift  # (M, d) back in feature units
            book = self.codebook_in.float()  # (K, d)
            # The quantizer's own expansion of ||x - c||^2, so that small tau reproduces its argmin.
            dist = x.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1) - 2 * x @ book.T  # (M, K)
            return F.softmax(-dist / self.tau, dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.weights(tokens)  # (M, K)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            return w @ self.image_embed.float()  # (M, D)
