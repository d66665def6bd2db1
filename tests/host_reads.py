"""Counting host reads of tensor values (`.item()`, `bool(t)`, `int(t)`, `float(t)`, `.tolist()`).

On a GPU each such read waits for the device to finish, so a training step should make at most
one. A TorchFunctionMode sees every one made from Python (a dispatch mode would also see them, as
aten::_local_scalar_dense, but it cannot pass FlexAttention's higher-order operator through).
`where` names the omni source line of each read, to point at the culprit when a count is off.
"""

from __future__ import annotations

import collections
import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode

READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.tolist, torch.Tensor.__index__}


class HostReads(TorchFunctionMode):
    def __init__(self, ignore: tuple[str, ...] = ()):
        super().__init__()
        self.n = 0
        self.where: collections.Counter = collections.Counter()
        self.ignore = ignore  # reads made from files whose path contains one of these are not counted

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            stack = traceback.extract_stack()
            if any(part in f.filename for f in stack for part in self.ignore):
                return func(*args, **(kwargs or {}))
            self.n += 1
            frames = [f for f in stack if "/omni/" in f.filename]
            self.where[f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_host_reads(ignore: tuple[str, ...] = ()):
    mode = HostReads(ignore)
    with mode:
        yield mode
