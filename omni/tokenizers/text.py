"""Text tokenizer: a Hugging Face tokenizer plus omni's image special tokens.

Pretrained backbones keep their own tokenizer (loaded from a local directory, never with
remote code); from-scratch models use a sentencepiece model trained on the shards' text
(`train_sentencepiece`, behind `omni data tokenizer`) and saved in the same HF format.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

DEFAULT_SPECIAL = {"boi": "<boi>", "eoi": "<eoi>", "img": "<img>"}
SPECIAL_FILE = "omni_special_tokens.json"


class TextTokenizer:
    """Wraps a `PreTrainedTokenizerBase`; exposes the ids the layout and the sampler need."""

    def __init__(self, hf_tokenizer, special: dict[str, str] | None = None):
        self.hf = hf_tokenizer
        self.special = dict(DEFAULT_SPECIAL, **(special or {}))
        missing = [t for t in self.special.values() if t not in self.hf.get_vocab()]
        if missing:
            self.hf.add_special_tokens({"additional_special_tokens": missing})
        for name in ("bos", "eos"):
            if getattr(self.hf, f"{name}_token_id") is None:
                raise ValueError(f"tokenizer has no {name} token; set tokenizer.{name}_token before use")
        if self.hf.pad_token_id is None:
            self.hf.pad_token = self.hf.eos_token

    # ids -------------------------------------------------------------------------------------
    def _id(self, key: str) -> int:
        return self.hf.convert_tokens_to_ids(self.special[key])

    @property
    def boi_id(self) -> int:
        return self._id("boi")

    @property
    def eoi_id(self) -> int:
        return self._id("eoi")

    @property
    def img_id(self) -> int:
        return self._id("img")

    @property
    def bos_id(self) -> int:
        return self.hf.bos_token_id

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id

    def __len__(self) -> int:
        return len(self.hf)

    # text ------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()

    # persistence -----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(path)
        (path / SPECIAL_FILE).write_text(json.dumps(self.special, indent=2))

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False) -> TextTokenizer:
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer directory {str(path)!r} does not exist; train one with "
                "`omni data tokenizer --shards ... --out DIR` or point model.tokenizer at a HF tokenizer"
            )
        hf = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        special = json.loads((path / SPECIAL_FILE).read_text()) if (path / SPECIAL_FILE).exists() else None
        return cls(hf, special)


def train_sentencepiece(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512, model_type: str = "unigram"
) -> TextTokenizer:
    """Train a sentencepiece model on `texts` and save it as a HF fast tokenizer in `out_dir`."""
    import tempfile

    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no text to train the tokenizer on: the shards hold no text segments")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"{tmp}/sp"
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_prefix=prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=1.0,
            byte_fallback=False,
            hard_vocab_limit=False,  # tiny corpora may not support the full vocab size
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            minloglevel=2,
        )
        sp = spm.SentencePieceProcessor(model_file=f"{prefix}.model")
        vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        Path(out_dir, "sentencepiece.model").write_bytes(Path(f"{prefix}.model").read_bytes())
    # The same unigram model, expressed with HF `tokenizers` so AutoTokenizer loads it offline.
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok = TextTokenizer(hf)
    tok.save_pretrained(out_dir)
    return tok
