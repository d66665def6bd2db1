"""What every benchmark shares: the machine record, timers, device peaks, and a random-weight model.

Numbers from a shared 2-core CPU are noisy, so timings are best-of-n (the run least disturbed by
other processes) and the suite compares ratios measured inside one run, never across runs.

Device peaks. On a GPU the denominators of MFU and of the memory-bandwidth bound are the vendor's
dense bf16 FLOP/s and HBM bandwidth for the device name (table below; `--peak-tflops` and
`--bandwidth-gbs` override). On a CPU there is no vendor number worth quoting, so both are
measured here: a large fp32 matmul on the benchmark's thread count, and a large tensor copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent

CORPUS = [
    "a red circle left of a blue square.",
    "a green triangle above a yellow circle.",
    "what color is the square? purple",
    "how many circles are there? three",
    "an orange square below a red triangle.",
    "draw the digit 7.",
] * 10

# name fragment -> (dense bf16 TFLOP/s, memory GB/s), from the vendors' data sheets (SXM unless named).
GPU_SPECS: dict[str, tuple[float, float]] = {
    "H200": (989.0, 4800.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100 NVL": (835.0, 3900.0),
    "H100": (989.0, 3350.0),
    "A100-SXM4-80GB": (312.0, 2039.0),
    "A100 80GB PCIe": (312.0, 1935.0),
    "A100": (312.0, 1555.0),
    "L40S": (362.0, 864.0),
    "L4": (121.0, 300.0),
    "A10": (125.0, 600.0),
}


# --------------------------------------------------------------------------------------------
# Devices and timing
# --------------------------------------------------------------------------------------------


def resolve_device(name: str | None) -> torch.device:
    """`cpu`, `cuda` or None (CUDA when present); a missing CUDA is an error, not a silent CPU run."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch.cuda.is_available() is False; use --device cpu")
    return device


@contextlib.contextmanager
def cpu_threads(device: torch.device, threads: int | None) -> Iterator[int]:
    """Run the block on `threads` torch threads (default 1 on CPU; GPUs are left alone).

    On a small shared CPU, threads that wait for each other make tiny matmuls many times slower
    and timings meaningless; one thread is slower in principle but stable.
    """
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or 1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved_best(fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int,
                     warmup: int = 1) -> dict[str, float]:
    """Best-of-`repeats` seconds of each fn, timed in rounds (a, b, c, a, b, c, ...).

    Interleaving exposes every contender to the same drift in machine load, so their ratios stay
    meaningful on a shared machine where back-to-back blocks of runs would not be.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t)
    return best


class Stopwatch:
    """Accumulates time spent inside wrapped callables (synchronising CUDA around each call)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            sync(self.device)
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
            return out

        return timed


def train_autocast(device: torch.device) -> tuple[Callable[[], contextlib.AbstractContextManager], str]:
    """The forward's autocast as `omni train` runs it at `train.precision=auto`, and its name: bf16
    where the device computes it natively (a GPU, a CPU with AMX or AVX512-BF16), else fp32 -- on
    an AVX2-only CPU emulated bf16 matmuls run ~60x slower than fp32 ones, and the trainer never
    uses them there, so neither does a benchmark of its step."""
    from omni.train.engine import autocast, resolve_precision

    precision = resolve_precision("auto")
    return (lambda: autocast(precision, device)), precision


def measured_bandwidth_gbs(device: torch.device, mbytes: int = 256) -> float:
    """Copy bandwidth in GB/s (bytes read + written per second) of a large tensor copy."""
    n = mbytes * (1 << 20) // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), device, repeats=5)
    return 2 * src.numel() * 4 / seconds / 1e9


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Throughput of one large square matmul: the practical peak of this device and thread count."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = best_time(lambda: a @ b, device, repeats=10, warmup=2)
    return 2 * n**3 / seconds / 1e12


def device_peaks(device: torch.device, peak_tflops: float | None = None,
                 bandwidth_gbs: float | None = None) -> dict[str, Any]:
    """The FLOP/s and bandwidth that MFU and the bandwidth bound divide by, and where they come from."""
    out: dict[str, Any] = {}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = next((v for k, v in GPU_SPECS.items() if k in name), None)
        out["gemm_tflops_measured_bf16"] = round(measured_matmul_tflops(device, torch.bfloat16), 1)
        out["copy_gbs_measured"] = round(measured_bandwidth_gbs(device, 1024), 1)
        out["peak_tflops"] = peak_tflops or (spec[0] if spec else out["gemm_tflops_measured_bf16"])
        out["bandwidth_gbs"] = bandwidth_gbs or (spec[1] if spec else out["copy_gbs_measured"])
        out["source"] = "override" if peak_tflops or bandwidth_gbs else ("spec sheet" if spec else "measured")
    else:
        out["gemm_tflops_measured_fp32"] = round(measured_matmul_tflops(device, torch.float32), 4)
        out["copy_gbs_measured"] = round(measured_bandwidth_gbs(device), 1)
        out["peak_tflops"] = peak_tflops or out["gemm_tflops_measured_fp32"]
        out["bandwidth_gbs"] = bandwidth_gbs or out["copy_gbs_measured"]
        out["source"] = "override" if peak_tflops or bandwidth_gbs else "measured (fp32 matmul, tensor copy)"
    return out


# --------------------------------------------------------------------------------------------
# Machine record
# --------------------------------------------------------------------------------------------


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5, check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5, check=False)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Everything needed to tell two result files apart: hardware, library versions, commit."""
    import transformers

    try:  # not needed to train or draw (the head's schedule tables are computed without it)
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = "not installed"

    info: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "diffusers": diffusers_version,
        "platform": platform.platform(),
        "commit": _git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        try:
            import flash_attn

            info["flash_attn"] = flash_attn.__version__
        except ImportError:
            info["flash_attn"] = None
    return info


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def bench_config(preset: str, tmp: str | Path, overrides: list[str] | None = None):
    """The preset's Config with a locally trained tokenizer (nothing downloaded, weights random)."""
    from omni.config import load_config
    from omni.tokenizers.text import train_sentencepiece

    tok_dir = Path(tmp) / "tok"
    if not (tok_dir / "tokenizer_config.json").exists():
        train_sentencepiece(CORPUS, tok_dir, vocab_size=96)
    return load_config(preset, [f"model.tokenizer={tok_dir}", *(overrides or [])])


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


@contextmanager
def head_options(model, schedule: str = "constant", dtype: torch.dtype | None = None,
                 stats: dict | None = None) -> Iterator[None]:
    """model.head.sample with per-token steps (generation.image_steps_schedule) and a compute dtype.

    The sampler applies `generation.image_steps_schedule` and `head_dtype` per row itself; the
    benchmark wraps the head instead so it can count the head steps run and vary both without a
    new config per run (the sampler's own values, constant and float32 here, are replaced): in image mode every row of a batch draws token i in the same call, so call k is
    token k mod N (checked: the batch size stays the same through each image). `stats` collects
    the head steps run ("steps") and the calls ("calls").
    """
    from omni.config import GenerationConfig, steps_for_token

    head, n = model.head, model.image_tokenizer.num_tokens
    sample, state = head.sample, {"k": 0, "rows": None}
    stats = {} if stats is None else stats

    def wrapped(cond, *args, steps=20, **kwargs):
        i = state["k"] % n
        if i == 0:
            state["rows"] = cond.shape[0]
        elif cond.shape[0] != state["rows"]:
            raise RuntimeError(f"token {i} drew {cond.shape[0]} rows, token 0 drew {state['rows']}: not lockstep")
        state["k"] += 1
        steps = steps_for_token(GenerationConfig(image_steps=steps, image_steps_schedule=schedule), i, n)
        stats["steps"] = stats.get("steps", 0) + steps
        stats["calls"] = stats.get("calls", 0) + 1
        kwargs.pop("dtype", None)  # the sampler's head_dtype; this run's `dtype` replaces it
        return sample(cond, *args, steps=steps, dtype=dtype, **kwargs)

    own = "sample" in vars(head)  # already wrapped (a Stopwatch): put that wrapper back after
    head.sample = wrapped
    try:
        yield
    finally:
        if own:
            head.sample = sample
        else:
            del head.sample


def write_result(out_dir: str | Path | None, name: str, result: dict[str, Any]) -> Path | None:
    """`result` as OUT_DIR/NAME (indented JSON), noted on stderr; nothing when `out_dir` is None."""
    if not out_dir:
        return None
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return path
