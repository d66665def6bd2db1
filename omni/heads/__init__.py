"""Output heads: the backbone's LM head for text, a per-token diffusion head for image tokens."""

from omni.heads.diffusion import DiffusionHead
from omni.heads.lm import lm_loss

__all__ = ["DiffusionHead", "lm_loss"]
