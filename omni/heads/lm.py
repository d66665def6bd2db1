"""Text loss on the backbone's LM head, computed only where there are labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of `lm_head(hidden)` against `labels` (-100 = ignore) -> (loss, count).

    hidden (B, L, D), labels (B, L) already aligned: labels[b, p] is the token hidden[b, p] predicts.
    Only labelled positions go through the LM head, which saves the (B, L, V) logits tensor. The
    count stays a tensor, so nothing is read back to the host (a step should not wait on the GPU);
    with no labelled position the loss is 0, still connected to the graph.
    """
    sel = labels != -100  # (B, L)
    n = sel.sum()
    logits = lm_head(hidden[sel])  # (T, V)
    total = F.cross_entropy(logits.float(), labels[sel], reduction="sum")
    return total / n.clamp(min=1), n
