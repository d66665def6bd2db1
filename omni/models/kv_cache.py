"""KV caches for the sampler: transformers' DynamicCache, or a static, preallocated one.

The sampler's streams share one length T (left padding evens them out), and everything it does to
a cache between forwards is one of four row/column moves: gather rows (CFG streams join, finished
rows leave), concatenate the rows of two caches (joiners merge into the batch), put padding in
front of every row (the other side of a merge is longer) and drop shared padding from the front
(`_trim`). `KVOps` does the four on either kind, so the sampler never asks which one it holds.

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
import torch.nn.functional as F

CAPACITY_STEP = 64  # static capacity rounds up to this many positions (fewer distinct shapes)


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


def round_capacity(n: int) -> int:
    return -(-n // CAPACITY_STEP) * CAPACITY_STEP


class KVOps:
    """The sampler's cache moves for one kind of cache (static or dynamic); `length` is T, the
    positions every stream holds (a static cache holds more, stale, past it)."""

    def __init__(self, config, static: bool):
        self.config, self.static = config, static

    def make(self, layers: list[tuple[torch.Tensor, torch.Tensor]]):
        if self.static:
            return StaticKV(layers)
        from transformers import DynamicCache

        return DynamicCache(layers, config=self.config)

    def tensors(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(c.keys, c.values) for c in cache.layers]

    def gather(self, caches: list, index: torch.Tensor):
        """Rows `index` of the caches' rows stacked in order (static caches share one capacity)."""
        layers = []
        for parts in zip(*(c.layers for c in caches)):
            keys = torch.cat([p.keys for p in parts]) if len(parts) > 1 else parts[0].keys  # (S_all, H, T, hd)
            values = torch.cat([p.values for p in parts]) if len(parts) > 1 else parts[0].values
            layers.append((keys.index_select(0, index), values.index_select(0, index)))
        return self.make(layers)

    def concat(self, a, b):
        """Rows of `a` then rows of `b` (same length; static: same capacity, see `fit`)."""
        return self.make([(torch.cat([x.keys, y.keys]), torch.cat([x.values, y.values]))  # (S + s, H, T, hd)
                          for x, y in zip(a.layers, b.layers)])

    def pad_front(self, cache, n: int, length: int):
        """n padding positions in front of the `length` held ones (their keys are masked)."""
        if cache is None or n == 0:
            return cache
        if not self.static:
            return self.make([(F.pad(c.keys, (0, 0, n, 0)), F.pad(c.values, (0, 0, n, 0)))  # (S, H, n + T, hd)
                              for c in cache.layers])
        cap = max(cache.capacity, round_capacity(length + n))
        return self.make([(self._placed(c.keys, n, length, cap), self._placed(c.values, n, length, cap))
                          for c in cache.layers])

    def drop_front(self, cache, m: int, length: int):
        """Drop the first m positions (shared padding)."""
        if not self.static:
            return self.make([(c.keys[:, :, m:], c.values[:, :, m:]) for c in cache.layers])
        return self.make([(self._placed(c.keys[:, :, m:], 0, length - m, cache.capacity),
                           self._placed(c.values[:, :, m:], 0, length - m, cache.capacity)) for c in cache.layers])

    def fit(self, cache, capacity: int):
        """A static cache with at least `capacity` positions (the same tensors when it has them)."""
        if cache is None or not self.static or cache.capacity >= capacity:
            return cache
        cap = round_capacity(capacity)
        return self.make([(self._placed(c.keys, 0, c.keys.shape[2], cap), self._placed(c.values, 0, c.values.shape[2], cap))
                          for c in cache.layers])

    @staticmethod
    def _placed(x: torch.Tensor, n: int, length: int, capacity: int) -> torch.Tensor:
        """A zero (S, H, capacity, hd) tensor holding x's first `length` positions from position n."""
        out = x.new_zeros(x.shape[0], x.shape[1], capacity, x.shape[3])
        out[:, :, n:n + length] = x[:, :, :length]
        return out
