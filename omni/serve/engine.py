"""The model worker: one thread owns the model and runs every request through the shared sampler.

The HTTP side (app.py) never touches the model. It submits a `Job` and reads the job's events
from an asyncio queue: ("text", delta), ("image_start", total), ("image_token", done, total),
("image", PIL.Image), then ("done", GenerationResult) or ("error", http_status, message). Each
item of the queue is the list of one job's events from one decode step: the worker thread
collects every job's events during a step and hands them all to the event loop with one
`loop.call_soon_threadsafe` after it, so the event loop wakes once a step, not once an event,
and a streaming client gets one write per step.

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
from omni.inference.chat import Turn, chat_prompt, conversation_prompt
from omni.inference.generate import check_config, generation_config
from omni.inference.generate import load as load_model
from omni.inference.prompts import context_length, prompt_length
from omni.inference.rows import GenerationEvents, GenerationResult
from omni.inference.sampler import Sampler

__all__ = ["MODES", "Busy", "GenerationConfig", "GenerationResult", "Job", "Turn", "Worker", "chat_prompt",
           "check_config", "context_length", "conversation_prompt", "generation_config", "load_model",
           "prompt_length"]

log = logging.getLogger("omni.serve")


class Busy(Exception):
    """The waiting line is full; `retry_after` is a guess in seconds at when a slot frees up."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)  # a job is itself, not its fields (the worker looks jobs up by identity)
class Job:
    """One chat completion: what to sample, and where its events go."""

    id: str
    prompt: list  # segments (str | PIL.Image), the rendered conversation
    cfg: GenerationConfig
    mode: str
    seed: int
    deadline: float  # time.monotonic() after which the job is stopped ("time_limit")
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # items: lists of events, one per step
    cancelled: bool = False  # set by the HTTP side when the client disconnects
    timed_out: bool = False
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # when the job joined the batch
    pending: list = field(default_factory=list)  # events of the current step (worker thread only)

    def emit(self, *event: Any) -> None:
        """Queue an event; the worker delivers the step's events together (`_deliver`)."""
        self.pending.append(event)

    def should_stop(self) -> bool:
        if not self.timed_out and time.monotonic() > self.deadline:
            self.timed_out = True
        return self.cancelled or self.timed_out


class _JobEvents(GenerationEvents):
    """The sampler's hooks for one job's row: they become the job's events."""

    def __init__(self, job: Job):
        self.job = job

    def text(self, row: int, delta: str) -> None:
        self.job.emit("text", delta)

    def image_start(self, row: int, total: int) -> None:
        self.job.emit("image_start", total)

    def image_token(self, row: int, done: int, total: int) -> None:
        self.job.emit("image_token", done, total)

    def image_done(self, row: int, image) -> None:
        self.job.emit("image", image)

    def should_stop(self) -> bool:
        return self.job.should_stop()


class Worker:
    """Runs jobs on `model` in a background thread with continuous batching: a job joins the
    sampler's batch at the next decode step after a slot frees up, and leaves when it is done."""

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
        self.steps = 0
        self.step_seconds = 0.05  # running mean of one decode step, for Retry-After
        self.outbox: dict[int, Job] = {}  # id -> job with events to deliver after this step (worker thread only)

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
            return {"running": len(self.running), "waiting": len(self.waiting), "served": self.served,
                    "cancelled": self.cancelled, "steps": self.steps, "max_running": self.max_running,
                    "max_waiting": self.max_waiting}

    # -- the worker thread ---------------------------------------------------------------------
    def _admit(self, busy: bool) -> list[Job] | None:
        """Waiting jobs that fit in the batch now (blocks while there is nothing to do); None: stop."""
        with self.cond:
            while not self.stopping and not self.waiting and not busy:
                self.cond.wait()
            if self.stopping:
                return None
            new = []
            while self.waiting and len(self.running) < self.max_running:
                job = self.waiting.popleft()
                if job.should_stop():  # gone, or out of time while it waited
                    msg = "the request waited past its time limit for a free slot; retry later"
                    self._send(job, ("error", 503, msg))
                    self.served += 1
                    continue
                self.running.append(job)
                new.append(job)
            return new

    def _loop(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        sampler = Sampler(self.model, cfg=default_config(self.model))
        rows: dict[int, Job] = {}  # id(row) -> job
        while True:
            new = self._admit(busy=bool(rows))
            if new is None:
                break
            try:
                sampler = self._step(sampler, rows, new)
            finally:
                self._deliver()

    def _step(self, sampler: Sampler, rows: dict[int, Job], new: list[Job]) -> Sampler:
        """Admit `new` jobs and run one decode step of the batch; the sampler to go on with."""
        now = time.monotonic()
        for job in new:
            job.started = now
            try:
                rows[id(sampler.add(job.prompt, job.cfg, job.mode, job.seed, events=_JobEvents(job)))] = job
            except ValueError as e:  # the prompt does not fit: this job's fault only
                self._done(job, ("error", 400, str(e)))
        if not rows:
            return sampler
        try:
            t = time.monotonic()
            finished = sampler.step()
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.monotonic() - t)
            self.steps += 1
        except Exception:  # a failure is the batch's, not the server's: fail its jobs, start afresh
            log.exception("decode step failed for %s", ", ".join(j.id for j in rows.values()))
            for job in rows.values():
                job.pending.clear()  # events of the failed step: the client gets the error instead
                self._done(job, ("error", 500, (f"internal error while generating (request {job.id}); "
                                               "the server log has the details")))
            rows.clear()
            return Sampler(self.model, cfg=default_config(self.model))
        for job in rows.values():
            if job.pending:
                self.outbox[id(job)] = job
        for row in finished:
            job = rows.pop(id(row))
            result = row.result()
            if result.finish_reason == "cancelled" and job.timed_out:
                result.finish_reason = "time_limit"
            elif result.finish_reason == "cancelled":
                self.cancelled += 1
            self._done(job, ("done", result))
        return sampler

    def _send(self, job: Job, event: tuple) -> None:
        """Queue `event` for `job` and mark the job for this step's delivery."""
        self.outbox[id(job)] = job
        job.emit(*event)

    def _deliver(self) -> None:
        """Hand every job's events of this step to its event loop: one thread-safe call per loop."""
        if not self.outbox:
            return
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
        for job in self.outbox.values():
            if job.pending:
                by_loop.setdefault(id(job.loop), (job.loop, []))[1].append((job.events, job.pending))
                job.pending = []
        self.outbox = {}
        for loop, batch in by_loop.values():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the loop is closed (the server is shutting down): nobody listens
                pass

    def _done(self, job: Job, event: tuple) -> None:
        self._send(job, event)
        with self.cond:
            if job in self.running:
                self.running.remove(job)
            self.served += 1


def _put_all(batch: list[tuple[asyncio.Queue, list]]) -> None:
    """On the event loop: each job's events of one step, as one queue item."""
    for queue, events in batch:
        queue.put_nowait(events)


def default_config(model, **overrides: Any) -> GenerationConfig:
    """The checkpoint's generation defaults with request overrides; the server always caches."""
    return generation_config(model, **overrides, use_cache=True, cuda_graphs=False)

