"""The errors a user can cause, as one line naming the value and the fix (`omni` prints it; `--debug`
shows the traceback instead).

The code raises ValueError / FileNotFoundError with complete messages where it checks inputs;
this module covers the families that come from below: the operating system (a read-only or full
disk, a directory where a file was expected), image decoding, YAML, safetensors and torch's own
write errors. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno

USER_ERRORS = (ValueError, FileNotFoundError)


def _os_line(e: OSError) -> str:
    where = e.filename if e.filename is not None else None
    if where is None:
        return str(e)
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while writing {where}; free some space or choose another --out"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {where}: {e.strerror}; choose a writable --out (or fix the directory's permissions)"
    if e.errno == errno.EISDIR:
        return f"{where} is a directory; give a file"
    if e.errno == errno.ENOTDIR:
        return f"{where} is not a directory (a file is in the way); give a directory path"
    if e.errno == errno.ENOENT:
        return f"{where} does not exist"
    return f"{where}: {e.strerror or e}"


def describe(e: BaseException) -> str | None:
    """One line for an expected error, or None for a bug (which keeps its traceback)."""
    if isinstance(e, USER_ERRORS) and not isinstance(e, OSError):
        return str(e)
    if isinstance(e, OSError):
        if len(e.args) == 1 and isinstance(e.args[0], str):  # raised by omni with a full message
            return e.args[0]
        return _os_line(e)
    name = type(e).__name__
    module = type(e).__module__ or ""
    if name == "DecompressionBombError":
        return f"{e}; the image is too large to open safely: resize it first"
    if module.startswith("yaml"):
        return f"not valid YAML: {str(e).splitlines()[0]}"
    if name == "SafetensorError":
        return f"not a readable safetensors file ({e}); export or copy the checkpoint again"
    if name in ("RunLocked", "TrainingError"):
        return str(e)
    text = str(e)
    if isinstance(e, RuntimeError) and ("iostream error" in text or "PytorchStreamWriter failed" in text
                                        or "No space left" in text):
        return (f"writing a file failed ({text.splitlines()[0]}): the disk may be full or the output directory "
                "read-only; free space or choose another --out")
    if "Torch not compiled with CUDA" in text or "no NVIDIA driver" in text:
        return "this torch build has no CUDA device; use --device cpu"
    return None
