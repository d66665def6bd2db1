"""One image-token step as one unit: embed the fed tokens, the backbone over a static KV cache, the
diffusion head's whole denoising loop under CFG; on CUDA captured once as a CUDA graph and replayed
for every later token, elsewhere run eagerly (the same code, so the CPU tests check its logic).

The sampler takes this path (`Sampler._image_step`) when `generation.cuda_graphs` and
`generation.static_cache` are on and a step is an image step in the steady state: every live row
is drawing with one head setting, the streams are [conditional rows..., unconditional rows...] of
one group, and the group's device state advanced in place (no row started or ended anything). The
first token of an image and every step where rows change take the ordinary path.

What the graph reads by address, and how it stays valid:
- the step state's tensors (ids, position ids, cells, mask inputs, the cache write index), which
  the sampler advances in place before each replay;
- the static cache's key/value tensors, written in place at the write index;
- the head's plan tensor (cached per settings by the head) and the weights;
- two static inputs copied in before each replay: the fed tokens (S, d) and the noise (n, B, d),
  drawn eagerly from the rows' own generators (so a row's numbers do not depend on the batch,
  graphed or not); with model.image_reference a third, each row's reference token (B, d).
A graph is captured once per bucket (streams, cache capacity, head steps and settings) and owns
the state and cache tensors it was captured on. When the sampler hands it another state or cache
(rows started or ended something: a new image, a row joined or left), their values are copied
into the graph's tensors and the state and cache are pointed at them (`_adopt`, one copy of the
cache per such event), so the next image replays the same graph instead of capturing again. At
most MAX_GRAPHS graphs are kept (each owns a memory pool; a step schedule uses one per level).

Tolerance: a replay runs the same kernels on the same inputs as the eager step, so the tokens
agree to float round-off (tests/test_decode_step.py::test_graphed_step_equals_eager, 1e-4 fp32).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

MAX_GRAPHS = 16  # buckets kept: streams x step-schedule levels of the live batches
STATE_TENSORS = ("ids", "pos", "is_img", "cells", "lo", "bos", "write", "keys")  # _StepState fields a graph reads


class ImageStep:
    """The fused image-token step of a Sampler: `__call__(...)` -> the drawn tokens (B, d)."""

    def __init__(self, compute: Callable[..., torch.Tensor], graphs: OrderedDict | None = None):
        # compute(state, cache, tokens (S, d), noise (n, B, d), head run, refs (B, d) or None)
        # -> tokens (B, d): the step's math
        self.compute = compute
        # Captured graphs by bucket; the sampler passes the model's own, so every generate() call on
        # a model replays the graphs an earlier call captured (a graph holds no sampler state).
        self.graphs: OrderedDict = OrderedDict() if graphs is None else graphs
        self.calls = 0  # fused steps run (tests and benchmarks read these)
        self.captures = 0  # graphs captured
        self.replays = 0

    def __call__(self, key: tuple, state, cache, tokens: torch.Tensor, noise: torch.Tensor, run: Callable,
                 refs: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        if not tokens.is_cuda:
            return self.compute(state, cache, tokens, noise, run, refs)
        key = (*key, tuple(tokens.shape), tuple(noise.shape), cache.capacity, refs is None)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(state, cache, tokens, noise, run, refs)
            self.graphs[key] = entry
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            _adopt(entry[4], state, cache)
        self.graphs.move_to_end(key)
        graph, static_tokens, static_noise, out = entry[:4]
        static_tokens.copy_(tokens)
        static_noise.copy_(noise)
        if refs is not None:
            entry[6].copy_(refs)
        graph.replay()
        self.replays += 1
        return out.clone()

    def _capture(self, state, cache, tokens: torch.Tensor, noise: torch.Tensor, run: Callable,
                 refs: torch.Tensor | None) -> tuple:
        static_tokens, static_noise = tokens.clone(), noise.clone()
        static_refs = None if refs is None else refs.clone()
        dev = tokens.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, lazy init, cuBLAS handles)
            self.compute(state, cache, static_tokens, static_noise, run, static_refs)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.compute(state, cache, static_tokens, static_noise, run, static_refs)
        self.captures += 1
        # The warm-up wrote this position's keys/values once already; the replay writes the same
        # values again at the same index, so running the step twice changes nothing.
        # `run` holds the plan tensor
        return graph, static_tokens, static_noise, out, _tensors(state, cache), run, static_refs


def _tensors(state, cache) -> list[tuple[object, str, torch.Tensor]]:
    """(owner, attribute, tensor) of everything a graph reads by address besides its static inputs."""
    out = [(state, name, getattr(state, name)) for name in STATE_TENSORS]
    for layer in cache.layers:
        out += [(layer, "keys", layer.keys), (layer, "values", layer.values)]
    return out


def _adopt(owned: list[tuple[object, str, torch.Tensor]], state, cache) -> None:
    """Point `state` and `cache` at the graph's tensors, holding their current values."""
    current = _tensors(state, cache)
    if len(current) != len(owned):
        raise RuntimeError("a graph bucket got a cache with another number of layers")
    for (owner, name, now), (_, _, mine) in zip(current, owned):
        if now is not mine:
            mine.copy_(now)
            setattr(owner, name, mine)
    cache.write = state.write
