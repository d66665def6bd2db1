"""One `omni train` per output directory: a lock file naming the process that holds it.

    RUN/.omni-train.lock    {"pid": 1234, "host": "node-3", "time": "..."}
    OUT/.omni-demo.lock     the same for `omni demo` (its training runs lock OUT/run* as above)

Global rank 0 creates it (O_EXCL) before any work and removes it when the run ends. A second run
on the same directory is refused, naming the holder. A lock whose process is gone (same host,
PID not alive) is stale: it is reported and taken over. A lock from another host cannot be
checked from here; the message says how to remove it once that run is known to be dead.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK = ".omni-train.lock"
DEMO_LOCK = ".omni-demo.lock"


class RunLocked(RuntimeError):
    """Another live `omni train` holds this output directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str | Path, name: str = LOCK, command: str = "omni train",
                 option: str = "train.out_dir"):
        self.path = Path(run_dir) / name
        self.command, self.option = command, option  # named in the message to a second taker
        self.held = False
        self.took_over: dict | None = None  # the stale holder, when there was one

    def _mine(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = self._mine()
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._read()
                if holder is None:  # being written right now, or garbage: look again
                    time.sleep(0.05)
                    holder = self._read()
                if holder is not None and not self._stale(holder):
                    raise RunLocked(self._message(holder)) from None
                self.took_over = holder or {"pid": "?", "host": "?"}
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
            self.held = True
            return self
        raise RunLocked(f"{self.path}: could not take the lock (another run keeps taking it)")

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and "pid" in holder else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot check a process on another machine
        try:
            return not _alive(int(holder["pid"]))
        except (TypeError, ValueError):
            return True

    def _message(self, holder: dict) -> str:
        where = f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('time', '?')})"
        return (
            f"{self.path.parent} is in use by another {self.command}: {where} holds {self.path}. Wait for it to "
            f"finish or stop it, or choose another {self.option}; if that run is dead, delete {self.path}"
        )

    def release(self) -> None:
        if not self.held:
            return
        holder = self._read()
        if holder is not None and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
