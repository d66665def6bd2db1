"""The model worker: one thread owns the model and runs every request through the shared sampler.

The HTTP side (app.py) never touches the model. It submits a `Job` and reads the job's events
from an asyncio queue: ("text", delta), ("image_start", total), ("image_token", done, total),
("image", PIL.Image), then ("done", GenerationResult) or ("error", http_status, message). The worker thread
fills that queue with `loop.call_soon_threadsafe`, so events reach the client as they happen.

Admission: at most `max_running` jobs run in the sampler's batch, at most `max_waiting` wait
for a slot; beyond that `submit` raises `Busy` and the client gets a 429 with Retry-After. A job
whose client went away, or whose deadline passed, is cancelled between decode steps.

This module is the one place in omni.serve that imports the sampler (omni.inference); the
other modules take what they need from here.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from omni.config import MODES, GenerationConfig
from omni.inference.chat import Turn, chat_prompt
from omni.inference.generate import check_config, generate, generation_config
from omni.inference.generate import load as load_model
from omni.inference.prompts import context_length, prompt_length
from omni.inference.sampler import GenerationEvents, GenerationResult

__all__ = ["MODES", "Busy", "GenerationConfig", "GenerationResult", "Job", "Turn", "Worker", "chat_prompt",
           "check_config", "context_length", "generation_config", "load_model", "prompt_length"]

log = logging.getLogger("omni.serve")


class Busy(Exception):
    """The waiting line is full; `retry_after` is a guess in seconds at when a slot frees up."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    """One chat completion: what to sample, and where its events go."""

    id: str
    prompt: list  # segments (str | PIL.Image), the rendered conversation
    cfg: GenerationConfig
    mode: str
    seed: int
    deadline: float  # time.monotonic() after which the job is stopped ("time_limit")
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the HTTP side when the client disconnects
    timed_out: bool = False
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the job joined the batch

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def should_stop(self) -> bool:
        if not self.timed_out and time.monotonic() > self.deadline:
            self.timed_out = True
        return self.cancelled or self.timed_out


class _JobEvents(GenerationEvents):
    """Routes the sampler's per-row hooks to the job of each row."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def text(self, row: int, delta: str) -> None:
        self.jobs[row].emit("text", delta)

    def image_start(self, row: int, total: int) -> None:
        self.jobs[row].emit("image_start", total)

    def image_token(self, row: int, done: int, total: int) -> None:
        self.jobs[row].emit("image_token", done, total)

    def image_done(self, row: int, image) -> None:
        self.jobs[row].emit("image", image)

    def should_stop(self) -> bool:
        # Phase-1 batches stop as a whole, so a batch stops only when every job in it wants to.
        return all(j.should_stop() for j in self.jobs)


class Worker:
    """Runs jobs on `model` in a background thread, batching the ones that wait together."""

    def __init__(self, model, max_running: int = 8, max_waiting: int = 32):
        if max_running < 1 or max_waiting < 0:
            raise ValueError(f"max_running={max_running} must be >= 1 and max_waiting={max_waiting} >= 0")
        self.model = model
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.served = 0
        self.cancelled = 0  # jobs stopped because their client went away
        self.step_seconds = 0.05  # running mean of one decode step, for Retry-After

    # -- the HTTP side -------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="omni-serve-worker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise Busy("the server is shutting down", retry_after=5)
            free = self.max_running - len(self.running)
            if len(self.waiting) >= self.max_waiting + max(0, free):
                retry = max(1, round(self.step_seconds * job.cfg.max_new_tokens))
                raise Busy(f"{len(self.running)} requests are running and {len(self.waiting)} waiting (limits "
                           f"{self.max_running} and {self.max_waiting}); retry in {retry} s", retry_after=retry)
            self.waiting.append(job)
            self.cond.notify_all()

    def load(self) -> dict:
        with self.cond:
            return {"running": len(self.running), "waiting": len(self.waiting), "served": self.served, "cancelled": self.cancelled,
                    "max_running": self.max_running, "max_waiting": self.max_waiting}

    # -- the worker thread ---------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        """Up to max_running waiting jobs that share settings (phase 1: one generate call each)."""
        with self.cond:
            while not self.stopping and not self.waiting:
                self.cond.wait()
            if self.stopping:
                return None
            first = self.waiting[0]
            key = (first.cfg, first.mode)
            batch = [j for j in self.waiting if (j.cfg, j.mode) == key][: self.max_running]
            for j in batch:
                self.waiting.remove(j)
            self.running = batch
            return batch

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while True:
            batch = self._next_batch()
            if batch is None:
                break
            live = [j for j in batch if not j.should_stop()]
            for j in batch:
                if j not in live:
                    j.emit("error", 503, "the request waited past its time limit for a free slot; retry later")
            if live:
                self._run(live)
            with self.cond:
                self.running = []
                self.served += len(batch)

    def _run(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for j in jobs:
            j.started = now
        try:
            results = generate(self.model, [j.prompt for j in jobs], jobs[0].cfg, seeds=[j.seed for j in jobs],
                               mode=jobs[0].mode, events=_JobEvents(jobs))
        except Exception:  # (a failure is one batch's, not the server's)
            log.exception("generation failed for %s", ", ".join(j.id for j in jobs))
            for j in jobs:
                j.emit("error", 500, f"internal error while generating (request {j.id}); the server log has the details")
            return
        steps = max(1, max(len(r.ids) for r in results))
        self.step_seconds = 0.8 * self.step_seconds + 0.2 * (time.monotonic() - now) / steps
        for j, r in zip(jobs, results):
            if r.finish_reason == "cancelled" and j.timed_out:
                r.finish_reason = "time_limit"
            elif r.finish_reason == "cancelled":
                self.cancelled += 1
            j.emit("done", r)


def default_config(model, **overrides: Any) -> GenerationConfig:
    """The checkpoint's generation defaults with request overrides; the server always caches."""
    return generation_config(model, **overrides, use_cache=True, cuda_graphs=False)

