"""Text loss on the backbone's LM head, computed only where there are labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy of `lm_head(hidden)` against `labels` (-100 = ignore).

    hidden (B, L, D), labels (B, L) already aligned: labels[b, p] is the token hidden[b, p] predicts.
    Only labelled positions go through the LM head, which saves the (B, L, V) logits tensor.
    """
    sel = labels != -100  # (B, L)
    n = int(sel.sum())
    if n == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph connected for every parameter
    logits = lm_head(hidden[sel])  # (T, V)
    return F.cross_entropy(logits.float(), labels[sel]), n
