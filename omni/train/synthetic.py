"""Deterministic synthetic batches: fixed global batches sliced by rank, for tests and benchmarks.

Every optimizer step has one global batch of `rows_per_micro * grad_accum * world_size` rows,
generated from `(seed, step)` alone. Rank r's micro-batch m of a step is chunk `m * world + r`
(the same order the loop uses to seed noise), so 1 rank with 2 accumulation steps and 2
ranks with 1 see exactly the same rows in the same roles. Each row is a text / image / text
document with random token ids and Gaussian image tokens.

Supports `state_dict` / `load_state_dict` like the real loader, and can plant non-finite
image tokens in chosen batches (fault tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from omni.layout import Batch, ImageSegment, SpecialIds, TextSegment, layout


class SyntheticBatches:
    def __init__(self, special: SpecialIds, vocab_size: int, token_dim: int, n_image_tokens: int, *,
                 rows: int, seq_len: int, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                 seed: int = 0, nan_at: tuple[int, ...] = ()):
        self.special, self.vocab_size, self.token_dim = special, vocab_size, token_dim
        self.n_image_tokens, self.rows, self.seq_len = n_image_tokens, rows, seq_len
        self.rank, self.world_size, self.grad_accum, self.seed = rank, world_size, grad_accum, seed
        self.nan_at = set(nan_at)  # indices (in this rank's stream) of batches made non-finite
        self.text_ids = [i for i in range(vocab_size) if i not in vars(special).values()]
        self.index = 0  # batches yielded so far
        self.stats = {"nan_planted": 0}
        text = (seq_len - n_image_tokens - 4) // 2  # bos, boi, eoi, eos
        if text < 1:
            raise ValueError(f"seq_len={seq_len} cannot hold {n_image_tokens} image tokens plus text")
        self.text_len = min(text, 12)

    def chunk(self, step: int, chunk: int) -> Batch:
        """Chunk `chunk` (rows_per_micro rows) of step `step`'s global batch."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        total = self.rows * self.grad_accum * self.world_size
        ids = torch.randint(len(self.text_ids), (total, 2, self.text_len), generator=g)
        tokens = torch.randn(total, self.n_image_tokens, self.token_dim, generator=g)  # (rows, N, d)
        docs = []
        for r in range(chunk * self.rows, (chunk + 1) * self.rows):
            a, b = ([self.text_ids[i] for i in ids[r, k].tolist()] for k in range(2))
            docs.append([[TextSegment(a), ImageSegment(tokens[r]), TextSegment(b)]])
        return layout(docs, self.special, seq_len=self.seq_len, token_dim=self.token_dim)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            step, micro = divmod(self.index, self.grad_accum)
            batch = self.chunk(step, micro * self.world_size + self.rank)
            if self.index in self.nan_at:
                batch.image_tokens[:] = float("nan")
                self.stats["nan_planted"] += 1
            self.index += 1
            yield batch

    def state_dict(self) -> dict:
        return {"index": self.index, "stats": dict(self.stats)}

    def resume_at(self, step: int, skipped: int) -> None:
        """Continue after `step` optimizer steps and `skipped` bad micro-batches (the same on every rank),
        whatever the world size that consumed them: global batches depend on the step alone."""
        self.index = step * self.grad_accum + skipped

    def load_state_dict(self, state: dict) -> None:
        self.index = state["index"]
        self.stats = dict(state["stats"])
