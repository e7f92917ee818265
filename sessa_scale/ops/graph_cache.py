"""CUDA graphs for repeated calls of one shape, for ops whose time at small sizes is the CPU cost
of launching many kernels (the Triton feedback solve).

``GraphCache()(key, fn, inputs, outputs)`` runs fn(*inputs, *outputs), which writes its results
into ``outputs`` (tensors the caller allocates for every call).  A shape's first call runs eagerly
(compiling its kernels; one-off shapes are never captured).  Later calls replay a CUDA graph:

* a direct graph, keyed by the addresses of the inputs and outputs as well as their shapes: it
  reads and writes the call's own tensors in place.  Captured the second time a shape comes with
  the same addresses: the steady state of a training or benchmark loop, where the caching allocator
  hands each step's tensors the blocks of the step before.  Tensors under ``STAGED_BYTES`` are the
  exception: they are not part of the key, and the graph reads and writes copies of its own (a few
  KiB copied per call).  The allocator serves them from its small-block pool, where whatever else
  the process runs between two calls (another model's step in ``bench layer``) moves them.
* otherwise the shape's copying graph: the call's inputs are copied into its static inputs, it
  replays, and its static outputs are copied into the call's outputs.  Captured only once the
  shape has come with ``COPYING_AFTER`` different address sets (until then such calls run
  eagerly): a loop's first calls, before the allocator settles, do not leave static buffers behind.

Memory: all graphs of a device share one private memory pool (their intermediates overlap), and
the copying graphs one input arena (their static inputs overlap).  Both are safe because replays
are serialized on the caller's stream and no graph reads memory another graph wrote except its
own inputs, which are in place (direct) or copied in right before it replays (copying).  What
stays allocated per copying graph is its static outputs; per direct graph, its copies of the
call's small tensors.  Captures begin without torch.cuda.graph's empty_cache(), so that a capture
does not move later calls' tensors to new addresses, and in ``CAPTURE_MODE`` "thread_local", so
that other threads' CUDA calls (a data loader pinning host memory) cannot invalidate them.

``GRAPHS`` is the process's cache, used by the Triton feedback solve; ``clear_graphs()`` frees it
(benchmarks measure an op's memory from a cold cache); ``GRAPHS.counts`` tallies how calls ran.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import torch

_ALIGN = 256  # bytes between the static inputs in the arena
# cudaStreamCaptureMode of every capture: only the capturing thread is held to capture-safe CUDA calls.
# Under "global" (torch's default) a call such as cudaHostAlloc from any other thread (the data loader's
# pin-memory thread) invalidates the capture, which then fails the training step.
CAPTURE_MODE = "thread_local"
COPYING_AFTER = 3  # a shape's copying graph is captured once it has come with this many address sets
STAGED_BYTES = 1 << 20  # a direct graph copies tensors smaller than this in and out (the allocator's small blocks)


def _nbytes(shape, dtype) -> int:
    return (torch.Size(shape).numel() * torch.finfo(dtype).bits // 8 + _ALIGN - 1) // _ALIGN * _ALIGN


class _Graph:
    """One captured call: the CUDA graph and the static tensors it reads and writes in place of the
    call's own, by position among the inputs and among the outputs.  A copying graph (arena given)
    has static copies of every input (views of the arena) and output; a direct graph of the staged
    ones only (``staged``: per input, then per output, whether to copy it) and otherwise keeps no
    tensors, only their addresses."""

    def __init__(self, fn, inputs, outputs, pool, arena: torch.Tensor | None = None, staged=None):
        n = len(inputs)
        staged = [True] * (n + len(outputs)) if arena is not None else staged
        inputs, outputs = list(inputs), list(outputs)
        self.arena, self.static_inputs, self.static_outputs, off = arena, [], [], 0
        for i, t in enumerate(inputs):
            if staged[i]:
                if arena is not None:
                    static = arena[off:off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                    off += _nbytes(t.shape, t.dtype)
                else:
                    static = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                static.copy_(t)
                self.static_inputs.append((i, static))
                inputs[i] = static
        for i, o in enumerate(outputs):
            if staged[n + i]:
                outputs[i] = torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device)
                self.static_outputs.append((i, outputs[i]))
        self.graph = torch.cuda.CUDAGraph()
        caller, stream = torch.cuda.current_stream(), torch.cuda.Stream()
        stream.wait_stream(caller)  # the inputs were written on the caller's stream
        with torch.cuda.stream(stream):
            self.graph.capture_begin(pool=pool, capture_error_mode=CAPTURE_MODE)
            try:
                fn(*inputs, *outputs)
            finally:
                self.graph.capture_end()
        caller.wait_stream(stream)
        self.last_call = 0

    def __call__(self, inputs, outputs) -> None:
        for i, static in self.static_inputs:
            static.copy_(inputs[i])
        self.graph.replay()
        for i, static in self.static_outputs:
            outputs[i].copy_(static)


class GraphCache:
    """Direct graphs by (shape, addresses), at most ``max_direct`` (one unused for 2 * max_direct
    calls makes room for a new one), and copying graphs by shape, the least recently used evicted
    past ``max_copying``."""

    def __init__(self, max_direct: int = 128, max_copying: int = 8):
        self.max_direct, self.max_copying = max_direct, max_copying
        self._direct: dict = {}
        self._copying: OrderedDict = OrderedDict()
        self._seen: OrderedDict = OrderedDict()  # shape key -> OrderedDict of the address sets it came with
        self._pools: dict = {}  # device -> graph pool handle
        self._arenas: dict = {}  # device -> uint8 tensor holding the copying graphs' static inputs
        self._calls = 0
        self.counts: Counter = Counter()  # "eager", "direct", "copying" calls; "captures"

    def __len__(self) -> int:
        return len(self._direct) + len(self._copying)

    def __call__(self, key, fn, inputs, outputs, graphed: bool = True, arena_bytes: int = 0) -> None:
        """fn(*inputs, *outputs), or the replay of a graph of it (graphed=False: always fn).  The key
        names fn (the tensors' shapes, strides and dtypes are added).  arena_bytes: reserve at least
        this much for a copying graph's static inputs (e.g. a forward reserving its backward's, so
        that the arena grows once).  Inside a caller's own CUDA-graph capture fn runs as it is."""
        if not graphed or torch.cuda.is_current_stream_capturing():
            fn(*inputs, *outputs)
            return
        tensors = (*inputs, *outputs)
        device = tensors[0].device
        shape_key = (key, tuple((t.shape, t.stride(), t.dtype) for t in tensors), device)
        staged = [t.nbytes < STAGED_BYTES for t in tensors]
        addresses = tuple(t.data_ptr() for t, small in zip(tensors, staged) if not small)
        self._calls += 1
        graph = self._direct.get((shape_key, addresses))
        if graph is None:
            if addresses in self._seen.get(shape_key, ()) and self._room_for_direct():
                graph = _Graph(fn, inputs, outputs, self._pool(device), staged=staged)
                self._direct[(shape_key, addresses)] = graph
                self.counts["captures"] += 1
            else:
                graph = self._copying_graph(shape_key, addresses, fn, inputs, outputs, arena_bytes)
                if graph is None:
                    self.counts["eager"] += 1
                    fn(*inputs, *outputs)
                    return
        self.counts["direct" if graph.arena is None else "copying"] += 1
        graph.last_call = self._calls
        graph(inputs, outputs)

    def _remember(self, shape_key, addresses) -> None:
        seen = self._seen.setdefault(shape_key, OrderedDict())
        seen[addresses] = None
        seen.move_to_end(addresses)
        while len(seen) > 16:
            seen.popitem(last=False)
        self._seen.move_to_end(shape_key)
        while len(self._seen) > 64:
            self._seen.popitem(last=False)

    def _room_for_direct(self) -> bool:
        """Whether a new direct graph fits, evicting the least recently replayed one if it has not
        been replayed for 2 * max_direct calls (graphs in use are never evicted: no capture thrash)."""
        if len(self._direct) < self.max_direct:
            return True
        stale = min(self._direct, key=lambda k: self._direct[k].last_call)
        if self._direct[stale].last_call < self._calls - 2 * self.max_direct:
            del self._direct[stale]
            return True
        return False

    def _copying_graph(self, shape_key, addresses, fn, inputs, outputs, arena_bytes: int) -> _Graph | None:
        """The shape's copying graph for a call at addresses without a direct graph, captured once
        the shape has come with COPYING_AFTER different address sets (None before: run eagerly)."""
        self._remember(shape_key, addresses)
        graph = self._copying.get(shape_key)
        if graph is None:
            if len(self._seen[shape_key]) < COPYING_AFTER:
                return None
            device = inputs[0].device
            arena = self._arena(device, inputs, arena_bytes)
            graph = self._copying[shape_key] = _Graph(fn, inputs, outputs, self._pool(device), arena)
            self.counts["captures"] += 1
            while len(self._copying) > self.max_copying:
                self._copying.popitem(last=False)
        self._copying.move_to_end(shape_key)
        return graph

    def _pool(self, device):
        if device not in self._pools:
            with torch.cuda.device(device):
                self._pools[device] = torch.cuda.graph_pool_handle()
        return self._pools[device]

    def _arena(self, device, inputs, arena_bytes: int) -> torch.Tensor:
        """The device's arena, replaced by a larger one (and its copying graphs dropped, to be
        captured again on their next calls) when these inputs do not fit."""
        need = sum(_nbytes(t.shape, t.dtype) for t in inputs)
        arena = self._arenas.get(device)
        if arena is None or arena.numel() < need:
            for key in [key for key, graph in self._copying.items() if graph.arena is arena]:
                del self._copying[key]
            arena = self._arenas[device] = torch.empty(max(need, arena_bytes), dtype=torch.uint8, device=device)
        return arena

    def clear(self) -> None:
        """Drop every graph, the pools and the arenas (their memory returns to the allocator)."""
        self._direct.clear()
        self._copying.clear()
        self._seen.clear()
        self._pools.clear()
        self._arenas.clear()
        self.counts.clear()
        self._calls = 0


GRAPHS = GraphCache()


def clear_graphs() -> None:
    """Drop every captured CUDA graph of GRAPHS and its buffers."""
    GRAPHS.clear()
