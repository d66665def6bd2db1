"""DeepSpeed checkpoints read without running code: `torch.load` is held to `weights_only=True`.

DeepSpeed's loaders (`engine.load_checkpoint`, `zero_to_fp32`, `ds_to_universal`) call
`torch.load(..., weights_only=False)`, which unpickles arbitrary objects: a planted
`mp_rank_00_model_states.pt` in a run directory would run its code on `omni train --resume` or
`omni export`. `no_code_torch_load()` replaces `torch.load` for the duration of such a call with
one that always passes `weights_only=True` and allows, besides tensors and containers, exactly
the DeepSpeed types its checkpoints hold (listed by reading the pickles of the tiny model saved
under ZeRO-0/1/2/3 on CPU):

    deepspeed.runtime.fp16.loss_scaler.LossScaler / DynamicLossScaler   optimizer states
    deepspeed.runtime.zero.config.ZeroStageEnum                        optimizer states (`zero_stage`)
    deepspeed.utils.tensor_fragment.fragment_address                   ZeRO-1/2 `param_slice_mappings`

Anything else is refused with `UnsafeCheckpointError`, naming the file and the type.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import torch


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds an object that is not a tensor or an allowed DeepSpeed type."""


def allowed_globals() -> list:
    """The non-tensor types DeepSpeed writes into its checkpoint files (imported lazily)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_lock = threading.RLock()
_depth = 0
_original_load = torch.load


def _refusal(f, err: Exception) -> UnsafeCheckpointError:
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    what = f"the object {found.group(1)}" if found else "an object that is not a tensor"
    return UnsafeCheckpointError(
        f"{f}: refused to load: it holds {what}, and loading it would run code (omni reads DeepSpeed "
        "checkpoints with torch.load(weights_only=True)). This file was not written by omni train, or was "
        "changed since; delete this checkpoint tag, or resume/export another one (--tag / train.resume=TAG_DIR)"
    )


def _weights_only_load(f, *args, **kwargs):
    kwargs["weights_only"] = True  # whatever the caller asked for
    kwargs.pop("pickle_module", None)  # weights_only has its own unpickler
    try:
        return _original_load(f, *args, **kwargs)
    except pickle.UnpicklingError as e:
        raise _refusal(f, e) from None


@contextlib.contextmanager
def no_code_torch_load() -> Iterator[None]:
    """While open, every `torch.load` in the process is `weights_only=True` with DeepSpeed's types allowed."""
    global _depth
    with _lock:
        globals_ = allowed_globals()
        if _depth == 0:
            torch.load = _weights_only_load
        _depth += 1
    try:
        with torch.serialization.safe_globals(globals_):
            yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                torch.load = _original_load


def load_file(path: str | Path, **kwargs):
    """One checkpoint file, read as `no_code_torch_load` would (for omni's own readers)."""
    with no_code_torch_load():
        return torch.load(path, map_location=kwargs.pop("map_location", "cpu"), **kwargs)
