"""Small shared helpers: atomic writes, path names from data, devices, seeding, ranks."""

from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_like_open(path: str | Path) -> None:
    """Give a file or directory made by mkstemp / mkdtemp (0600 / 0700) the mode that open() and
    mkdir() would have given it under the user's umask: outputs on a shared filesystem stay
    readable by the team when the umask says so."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    share_like_open(tmp)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_png(image, path: str | Path) -> None:
    """Write a PIL image as PNG, atomically."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: object, max_len: int = 100) -> str:
    """One path component made from data (a shard key, a benchmark id): letters, digits, `_.-`.

    Every output path built from data goes through this, so a key like `../../tmp/x` or `/etc`
    stays one directory below the output root. A name that is already safe is returned
    unchanged (records of earlier runs keep their paths); one that had to change gets a short
    hash of the original, so two keys that clean to the same text do not share a directory.
    """
    text = str(text)
    name = _UNSAFE.sub("_", text).strip("._-")[:max_len] or "item"
    if name != text:
        name = f"{name}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"
    return name


def check_out_dir(path: str | Path, flag: str = "--out") -> Path:
    """An output folder that can be written, checked before any work (so nothing is generated in vain)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder for the outputs")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path} cannot be created ({e.strerror}); choose a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} is not writable; choose a writable folder")
    return path


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """A device the user named (`--device`), checked against this machine; None: `default_device()`."""
    if spec is None:
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {spec!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec} but this machine has no usable CUDA device (torch {torch.__version__}, "
                             f"built {'with' if torch.version.cuda else 'without'} CUDA); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec} but there are {torch.cuda.device_count()} CUDA device(s); "
                             f"use cuda:0 ... cuda:{torch.cuda.device_count() - 1}")
    elif device.type not in ("cpu", "mps", "meta"):
        raise ValueError(f"--device {spec!r}: omni runs on cpu or cuda")
    return device


def default_device() -> torch.device:
    """The one place that picks a device: CUDA when present, else CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank() -> int:
    """This process's rank: the one way ranks are read. The process group's once it exists, else
    what the launcher exported (torchrun / deepspeed set RANK before any group), else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the run, read the same way as `rank`."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return rank() == 0


def cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("amx_bf16", "avx512_bf16"))
