"""The global sample order: which sample every global position of a training stream reads.

A stream is an endless sequence of global positions 0, 1, 2, ... Position p is mapped to a
source by `Blend` and to that source's k-th sample by `SourceOrder`; both are pure functions of
(seed, the manifests, the weights), computed by random access, never by replaying a stream.
So the position is the whole data state, and it means the same thing for any number of
data-parallel ranks or DataLoader workers.

- `SourceOrder`: epoch e of a split visits every sample once: shards in a seeded permutation
  (seed, source, e), their samples concatenated, then shuffled within consecutive windows of
  `shuffle_buffer` samples (a seeded permutation per window). A window spans a few shards, so a
  reader moves through the shards in order, like webdataset's shard shuffle + shuffle buffer,
  but reproducibly and with random access. Sources run their epochs independently: a source with
  a large weight and few samples repeats sooner.
- `Blend`: positions come in blocks of BLEND_BLOCK; source s gets floor(C_s n) - floor(C_{s-1} n)
  of the first n = b * BLEND_BLOCK positions (C = cumulative normalized weights), laid out in a
  seeded random order inside each block. Every block's mix is within one sample per source of
  the weights, with no drift over time.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

BLEND_BLOCK = 4096


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


class SourceOrder:
    """Sample order of one split of one source. shard_samples: samples per shard (manifest order)."""

    def __init__(self, shard_samples: list[int], seed: int, source: int, shuffle_buffer: int, shuffle: bool = True):
        self.shard_samples = np.asarray(shard_samples, dtype=np.int64)
        self.num_samples = int(self.shard_samples.sum())
        self.seed, self.source, self.shuffle = seed, source, shuffle
        self.window = max(1, shuffle_buffer) if shuffle else 1
        self._epoch_cache = lru_cache(maxsize=2)(self._epoch_layout)
        self._window_cache = lru_cache(maxsize=4)(self._window_perm)

    def _epoch_layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order, start of each ordered shard in the concatenation) for `epoch`."""
        n = len(self.shard_samples)
        order = _rng(self.seed, 1, self.source, epoch).permutation(n) if self.shuffle else np.arange(n)
        starts = np.concatenate([[0], np.cumsum(self.shard_samples[order])])
        return order, starts

    def _window_perm(self, epoch: int, window: int) -> np.ndarray:
        size = min(self.window, self.num_samples - window * self.window)
        return _rng(self.seed, 2, self.source, epoch, window).permutation(size)

    def locate(self, k: int) -> tuple[int, int]:
        """(shard index in the manifest, sample offset in that shard) of the source's k-th sample
        (k counts across epochs)."""
        epoch, q = divmod(int(k), self.num_samples)
        if self.window > 1:
            w, r = divmod(q, self.window)
            q = w * self.window + int(self._window_cache(epoch, w)[r])
        order, starts = self._epoch_cache(epoch)
        i = int(np.searchsorted(starts, q, side="right")) - 1
        return int(order[i]), q - int(starts[i])


class Blend:
    """Maps global positions to (source, source-local index). weights: positive numbers."""

    def __init__(self, weights: list[float], seed: int, shuffle: bool = True):
        w = np.asarray(weights, dtype=np.float64)
        self.cumulative = np.cumsum(w / w.sum())
        self.cumulative[-1] = 1.0
        self.seed, self.shuffle = seed, shuffle
        self._block_cache = lru_cache(maxsize=2)(self._block)

    def _before(self, n: int) -> np.ndarray:
        """Samples of each source among the first n positions, n a multiple of BLEND_BLOCK."""
        edges = np.floor(self.cumulative * n).astype(np.int64)
        return np.diff(np.concatenate([[0], edges]))

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each position in block b, its source-local index)."""
        base = self._before(b * BLEND_BLOCK)
        counts = self._before((b + 1) * BLEND_BLOCK) - base
        sources = np.repeat(np.arange(len(counts)), counts)
        if self.shuffle and len(counts) > 1:
            sources = sources[_rng(self.seed, 3, b).permutation(BLEND_BLOCK)]
        local = np.empty(BLEND_BLOCK, dtype=np.int64)
        for s in range(len(counts)):
            mask = sources == s
            local[mask] = base[s] + np.arange(int(counts[s]))
        return sources, local

    def assign(self, position: int) -> tuple[int, int]:
        if len(self.cumulative) == 1:
            return 0, int(position)
        b, r = divmod(int(position), BLEND_BLOCK)
        sources, local = self._block_cache(b)
        return int(sources[r]), int(local[r])
