"""CUDA graphs for repeated calls of one shape, for ops whose time at small sizes is the CPU cost
of launching many kernels (the Triton feedback solve).

``GraphCache()(key, fn, inputs)`` runs fn(*inputs) -> tuple of tensors.  A key's first call runs
eagerly (compiling its kernels; one-off shapes are never captured), its second call captures fn
as a CUDA graph, later calls replay it.  A replay copies the inputs into the graph's static
inputs, replays, and clones the static outputs, so every call's results stay its own.

Memory: all graphs of a device share one private memory pool (their intermediates overlap) and
one input arena (their static inputs overlap).  Both are safe because replays are serialized on
the caller's stream and a replay's outputs are cloned before anything else runs: no graph reads
memory another graph wrote except its own inputs, which are copied in right before it replays.
What stays allocated per cached graph is its static outputs.

``GRAPHS`` is the process's cache, used by the Triton feedback solve; ``clear_graphs()`` frees it
(benchmarks measure an op's memory from a cold cache).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_ALIGN = 256  # bytes between the static inputs in the arena


def _nbytes(shape, dtype) -> int:
    return (torch.Size(shape).numel() * torch.finfo(dtype).bits // 8 + _ALIGN - 1) // _ALIGN * _ALIGN


class _Graph:
    """One captured call: static inputs (views of the arena), the CUDA graph, its static outputs."""

    def __init__(self, fn, inputs, arena: torch.Tensor, pool):
        self.inputs, off = [], 0
        for t in inputs:
            size = _nbytes(t.shape, t.dtype)
            static = arena[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            static.copy_(t)
            self.inputs.append(static)
            off += size
        self.arena = arena
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):  # on a side stream
            self.outputs = fn(*self.inputs)

    def __call__(self, inputs):
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        self.graph.replay()
        return tuple(o.clone() for o in self.outputs)  # later replays overwrite the static outputs


class GraphCache:
    """Captured calls by key, least recently used evicted past ``max_graphs``."""

    def __init__(self, max_graphs: int = 8):
        self.max_graphs = max_graphs
        self._graphs: OrderedDict = OrderedDict()
        self._seen: OrderedDict = OrderedDict()  # keys called once so far
        self._pools: dict = {}  # device -> graph pool handle
        self._arenas: dict = {}  # device -> uint8 tensor holding every graph's static inputs

    def __len__(self) -> int:
        return len(self._graphs)

    def __call__(self, key, fn, inputs, graphed: bool = True, arena_bytes: int = 0):
        """fn(*inputs), or the replay of its graph (graphed=False: always fn(*inputs)).  The key
        names fn (input shapes and dtypes are added).  arena_bytes: reserve at least this much for
        static inputs (e.g. a forward reserving its backward's, so that the arena grows once).
        Inside a caller's own CUDA-graph capture fn runs as it is, into that graph."""
        if not graphed or torch.cuda.is_current_stream_capturing():
            return fn(*inputs)
        device = inputs[0].device
        key = (key, tuple((t.shape, t.dtype) for t in inputs), device)
        entry = self._graphs.get(key)
        if entry is None:
            if key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > 8 * self.max_graphs:
                    self._seen.popitem(last=False)
                return fn(*inputs)
            entry = self._graphs[key] = _Graph(fn, inputs, self._arena(device, inputs, arena_bytes),
                                               self._pool(device))
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        return entry(inputs)

    def _pool(self, device):
        if device not in self._pools:
            with torch.cuda.device(device):
                self._pools[device] = torch.cuda.graph_pool_handle()
        return self._pools[device]

    def _arena(self, device, inputs, arena_bytes: int) -> torch.Tensor:
        """The device's arena, replaced by a larger one (and its graphs dropped, to be captured
        again on their next calls) when these inputs do not fit."""
        need = sum(_nbytes(t.shape, t.dtype) for t in inputs)
        arena = self._arenas.get(device)
        if arena is None or arena.numel() < need:
            for key in [key for key, graph in self._graphs.items() if graph.arena is arena]:
                del self._graphs[key]
            arena = self._arenas[device] = torch.empty(max(need, arena_bytes), dtype=torch.uint8, device=device)
        return arena

    def clear(self) -> None:
        """Drop every graph, the pools and the arenas (their memory returns to the allocator)."""
        self._graphs.clear()
        self._seen.clear()
        self._pools.clear()
        self._arenas.clear()


GRAPHS = GraphCache()


def clear_graphs() -> None:
    """Drop every captured CUDA graph of GRAPHS and its buffers."""
    GRAPHS.clear()
