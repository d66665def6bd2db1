"""KV caches for the sampler: a growing one with room to spare, or a static, preallocated one.

The sampler's streams share one length T (left padding evens them out), and everything it does to
a cache between forwards is one of four row/column moves: gather rows (CFG streams join, finished
rows leave), concatenate the rows of two caches (joiners merge into the batch), put padding in
front of every row (the other side of a merge is longer) and drop shared padding from the front
(`_trim`). `KVOps` does the four on either kind, so the sampler never asks which one it holds.

The growing cache (`GrowingKV`, the default) holds exactly the T positions every stream has, as
transformers' DynamicCache does, so the attention sees the same keys, shapes and mask, but it
keeps them in a buffer with SLACK spare positions: a forward writes its positions into the spare
room in place (DynamicCache concatenates, copying the whole cache every step), dropping shared
padding from the front moves a start offset (no copy), and a gather, a merge or front padding
copies each row once (DynamicCache's constructor copies what it is given a second time). Under
continuous batching (omni serve) these copies were ~15% of a batched step.

The static cache (`generation.static_cache`) keeps each layer's keys and values in one tensor of
a fixed capacity, (S, H, capacity, hd), and writes the positions a forward feeds in place at the
device index tensor `write` (never a Python int, so a step reads nothing from the host and a CUDA
graph can replay it). Positions past T hold stale values; the sampler's mask, built over the whole
capacity with `k <= q`, hides them, so the attention sees exactly the keys a DynamicCache holds.
The capacity is set when rows join (the largest prompt + budget of the live rows, rounded up to
CAPACITY_STEP), so it never grows in the middle of a row: an image's token steps all see the same
tensors, which is what a captured graph needs. Only joins and leaves allocate.

The forward calls `update(k, v, layer)` with the new positions' keys/values (S, H, Q, hd) and
attends over what it returns; nothing else of transformers' Cache API is used with an explicit 4D
mask and position ids (both of which the sampler always passes).
"""

from __future__ import annotations

import torch

CAPACITY_STEP = 64  # static capacity rounds up to this many positions (fewer distinct shapes)
SLACK = 64  # spare positions a growing cache keeps past its last (reallocated when they run out)


class _StaticLayer:
    """One layer's keys and values (S, H, capacity, hd), written in place at the cache's `write` index."""

    is_sliding = False
    is_compileable = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cache: StaticKV):
        self.keys, self.values, self.cache = keys, values, cache

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        idx = self.cache.write  # (Q,) positions fed by this forward, a device tensor
        self.keys.index_copy_(2, idx, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, idx, value_states.to(self.values.dtype))
        return self.keys, self.values


def _cache_base():
    from transformers.cache_utils import Cache

    return Cache


class StaticKV(_cache_base()):
    """A transformers Cache of fixed capacity whose forwards write at `write` (a (Q,) device tensor)."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__(layers=[])
        self.layers = [_StaticLayer(k, v, self) for k, v in layers]
        self.write: torch.Tensor | None = None  # set by the sampler before every forward

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("StaticKV does not track its length; the sampler passes position ids and a 4D mask")

    @classmethod
    def empty(cls, config, streams: int, capacity: int, dtype: torch.dtype, device: torch.device) -> StaticKV:
        hf = config.get_text_config()
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        shape = (streams, hf.num_key_value_heads or hf.num_attention_heads, capacity, head_dim)
        return cls([(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                    for _ in range(hf.num_hidden_layers)])


class _GrowingLayer:
    """One layer's keys and values: positions [start, start + length) of buffers (S, H, capacity, hd)."""

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, start: int = 0,
                 length: int | None = None):
        self.k, self.v = keys, values  # None until the first update
        self.start = start
        self.length = 0 if keys is None else (keys.shape[2] - start if length is None else length)

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:, :, self.start:self.start + self.length]  # (S, H, T, hd), a view

    @property
    def values(self) -> torch.Tensor:
        return self.v[:, :, self.start:self.start + self.length]

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[2]
        if self.start + self.length + n > self.capacity:  # out of room: move to a bigger buffer
            room = self.length + n + SLACK
            held = (self.keys, self.values) if self.k is not None else (key_states[:, :, :0], value_states[:, :, :0])
            self.k, self.v = (_placed(x, 0, self.length, room) for x in held)
            self.start = 0
        end = self.start + self.length
        self.k[:, :, end:end + n] = key_states
        self.v[:, :, end:end + n] = value_states
        self.length += n
        return self.keys, self.values


def _placed(x: torch.Tensor, n: int, length: int, capacity: int) -> torch.Tensor:
    """A zero (S, H, capacity, hd) tensor holding x's first `length` positions from position n."""
    out = x.new_zeros(x.shape[0], x.shape[1], capacity, x.shape[3])
    out[:, :, n:n + length] = x[:, :, :length]
    return out


class GrowingKV(_cache_base()):
    """A transformers Cache that holds exactly the positions fed so far (as DynamicCache does) in
    buffers with spare room, so feeding positions writes in place instead of concatenating."""

    def __init__(self, layers: list[_GrowingLayer]):
        super().__init__(layers=[])
        self.layers = layers

    @classmethod
    def empty(cls, config) -> GrowingKV:
        return cls([_GrowingLayer() for _ in range(config.get_text_config().num_hidden_layers)])

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].length


def round_capacity(n: int) -> int:
    return -(-n // CAPACITY_STEP) * CAPACITY_STEP


class KVOps:
    """The sampler's cache moves for one kind of cache (static or dynamic); `length` is T, the
    positions every stream holds (a static cache holds more, stale, past it)."""

    def __init__(self, config, static: bool):
        self.config, self.static = config, static

    def make(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        """A cache over these (S, H, T, hd) tensors, taken as they are (no copy)."""
        if self.static:
            return StaticKV(layers)
        return GrowingKV([_GrowingLayer(k, v) for k, v in layers])

    def empty(self):
        """A growing cache with nothing in it yet (static caches are made by the sampler, sized)."""
        return GrowingKV.empty(self.config)

    def tensors(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(c.keys, c.values) for c in cache.layers]

    def gather(self, caches: list, index: torch.Tensor):
        """Rows `index` of the caches' rows stacked in order (static caches share one capacity)."""
        if not self.static and len(caches) == 1:  # one copy of the rows from their start, spare room included
            return GrowingKV([_GrowingLayer(c.k[:, :, c.start:].index_select(0, index),
                                            c.v[:, :, c.start:].index_select(0, index), 0, c.length)
                              for c in caches[0].layers])
        layers = []
        for parts in zip(*(c.layers for c in caches)):
            keys = torch.cat([p.keys for p in parts]) if len(parts) > 1 else parts[0].keys  # (S_all, H, T, hd)
            values = torch.cat([p.values for p in parts]) if len(parts) > 1 else parts[0].values
            layers.append((keys.index_select(0, index), values.index_select(0, index)))
        return self.make(layers)

    def concat(self, a, b):
        """Rows of `a` then rows of `b` (same length; static: same capacity, see `fit`)."""
        if not self.static:  # each side copied once, into a buffer with spare room
            return GrowingKV([_GrowingLayer(self._joined(x.keys, y.keys), self._joined(x.values, y.values), 0, x.length)
                              for x, y in zip(a.layers, b.layers)])
        return self.make([(torch.cat([x.keys, y.keys]), torch.cat([x.values, y.values]))  # (S + s, H, T, hd)
                          for x, y in zip(a.layers, b.layers)])

    def pad_front(self, cache, n: int, length: int):
        """n padding positions in front of the `length` held ones (their keys are masked)."""
        if cache is None or n == 0:
            return cache
        if not self.static:  # (S, H, n + T, hd) and spare room; the padding's keys are zeros, never stale
            return GrowingKV([_GrowingLayer(_placed(c.keys, n, length, n + length + SLACK),
                                            _placed(c.values, n, length, n + length + SLACK), 0, n + length)
                              for c in cache.layers])
        cap = max(cache.capacity, round_capacity(length + n))
        return self.make([(_placed(c.keys, n, length, cap), _placed(c.values, n, length, cap))
                          for c in cache.layers])

    def drop_front(self, cache, m: int, length: int):
        """Drop the first m positions (shared padding)."""
        if not self.static:  # no copy: the layers start m positions later in their buffers
            for c in cache.layers:
                c.start, c.length = c.start + m, c.length - m
            return cache
        return self.make([(_placed(c.keys[:, :, m:], 0, length - m, cache.capacity),
                           _placed(c.values[:, :, m:], 0, length - m, cache.capacity)) for c in cache.layers])

    def fit(self, cache, capacity: int):
        """A static cache with at least `capacity` positions (the same tensors when it has them)."""
        if cache is None or not self.static or cache.capacity >= capacity:
            return cache
        cap = round_capacity(capacity)
        return self.make([(_placed(c.keys, 0, c.keys.shape[2], cap), _placed(c.values, 0, c.values.shape[2], cap))
                          for c in cache.layers])

    @staticmethod
    def _joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(S + s, H, T + SLACK, hd): a's rows then b's, positions [0, T) filled."""
        T = a.shape[2]
        out = a.new_empty(a.shape[0] + b.shape[0], a.shape[1], T + SLACK, a.shape[3])
        out[:a.shape[0], :, :T] = a
        out[a.shape[0]:, :, :T] = b
        return out

