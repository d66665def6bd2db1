"""What a run reports: console progress, TensorBoard events, metrics.jsonl and log.txt, rank 0 only.

Metrics arrive already reduced across ranks (the loop sums them with one all-reduce), so what
rank 0 prints is the global picture. Other ranks construct a `Monitor` that does nothing, which
keeps rank checks out of the loop.

    RUN/metrics.jsonl   one JSON record per log interval / validation (what tests and plots read)
    RUN/log.txt         the console lines
    RUN/tb/             TensorBoard event files (`tensorboard --logdir RUN/tb`)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def _eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Monitor:
    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.bar = None
        self.tb = None
        if not enabled:
            return
        self.metrics_path = run_dir / "metrics.jsonl"
        self.log_path = run_dir / "log.txt"
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.tb = SummaryWriter(str(run_dir / "tb"))
        # A live bar on a terminal; in batch logs (no tty) only the periodic lines are printed.
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=not sys.stderr.isatty(), leave=False)

    def print(self, line: str) -> None:
        """A console line (also appended to log.txt)."""
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def record(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """Append a record to metrics.jsonl and TensorBoard."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)):
                self.tb.add_scalar(f"{kind}/{k}", v, step)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def train_line(self, step: int, m: dict[str, Any]) -> None:
        """The periodic progress line: step, losses, lr, throughput, ETA."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        done = max(1, step - self.start_step)
        eta = elapsed / done * (self.total - step)
        self.record("train", step, m)
        if self.bar is not None:
            self.bar.set_postfix(text=f"{m['loss_text']:.3f}", image=f"{m['loss_image']:.3f}",
                                 lr=f"{m['lr']:.2e}", tok_s=f"{m['tokens_per_s']:.0f}")
        bad = f" bad={m['bad_steps']}" if m.get("bad_steps") else ""
        skipped = "".join(f" {k}={v}" for k, v in m.get("data", {}).items() if v)
        self.print(
            f"step {step}/{self.total} loss {m['loss']:.4f} text {m['loss_text']:.4f} image {m['loss_image']:.4f} "
            f"lr {m['lr']:.2e} {m['tokens_per_s']:.0f} tok/s {m['s_per_step']:.3f} s/step eta {_eta(eta)}{bad}{skipped}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
