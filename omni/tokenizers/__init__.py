"""Text and image tokenizers (inside `omni` so they never shadow Hugging Face's `tokenizers`)."""

from omni.tokenizers.base import ImageTokenizer
from omni.tokenizers.image import PatchTokenizer, VAETokenizer, build_image_tokenizer
from omni.tokenizers.text import TextTokenizer, train_sentencepiece

__all__ = [
    "ImageTokenizer",
    "PatchTokenizer",
    "TextTokenizer",
    "VAETokenizer",
    "build_image_tokenizer",
    "train_sentencepiece",
]
