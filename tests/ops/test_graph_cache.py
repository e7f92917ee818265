"""The CUDA-graph cache's policy (sessa_scale/ops/graph_cache.py) on CPU: which calls run eagerly,
which capture a direct graph (keyed by the addresses of the tensors it does not stage) or the
shape's copying graph, and which direct graphs make room for new ones.  The CUDA capture itself is
replaced by a recorder that runs the function on the tensors a replay would touch; the real graphs
are tested on the GPU (tests/ops/test_feedback_triton.py: replays equal eager bitwise, direct and
copying)."""

from __future__ import annotations

import pytest
import torch

from sessa_scale.ops import graph_cache


class _RecordedGraph:
    """Stands in for graph_cache._Graph: keeps the captured function and replays it on the
    tensors a CUDA graph would read and write (its own for a direct graph, the call's for a copying
    one, through static copies)."""

    def __init__(self, fn, inputs, outputs, pool, arena=None, staged=None):
        self.fn, self.arena, self.last_call = fn, arena, 0
        self.staged = staged  # direct graphs only
        self.captured_at = self._in_place(inputs, outputs) if arena is None else None

    def _in_place(self, inputs, outputs) -> list[int]:
        return [t.data_ptr() for t, copied in zip((*inputs, *outputs), self.staged) if not copied]

    def __call__(self, inputs, outputs) -> None:
        if self.arena is None:  # a direct graph replays in place on the addresses it was captured with
            assert self._in_place(inputs, outputs) == self.captured_at
        self.fn(*inputs, *outputs)


@pytest.fixture
def cache(monkeypatch):
    monkeypatch.setattr(graph_cache, "_Graph", _RecordedGraph)
    monkeypatch.setattr(graph_cache.torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(graph_cache.GraphCache, "_pool", lambda self, device: None)
    monkeypatch.setattr(graph_cache, "STAGED_BYTES", 64)  # _SMALL tensors are staged, _LARGE ones not
    return graph_cache.GraphCache(max_direct=2)


_LARGE, _SMALL = 32, 4  # float32 elements: 128 and 16 bytes


def _double(x, out):
    out.copy_(2 * x)


def _call(cache, x, out, key="k"):
    cache(key, _double, (x,), (out,))
    assert torch.equal(out, 2 * x)


def test_repeated_addresses_capture_a_direct_graph_on_the_second_call(cache):
    x, out = torch.randn(_LARGE), torch.empty(_LARGE)
    for _ in range(4):
        x.normal_()  # new contents, same addresses
        _call(cache, x, out)
    assert dict(cache.counts) == {"eager": 1, "captures": 1, "direct": 3}
    assert len(cache) == 1


def test_new_addresses_run_eagerly_until_the_third_set_then_share_one_copying_graph(cache):
    held = []  # every call's tensors stay alive: the allocator cannot hand a later call the same addresses
    for i in range(5):
        held.append((torch.randn(_LARGE), torch.empty(_LARGE)))
        _call(cache, *held[-1])
    assert dict(cache.counts) == {"eager": graph_cache.COPYING_AFTER - 1, "captures": 1,
                                  "copying": 5 - (graph_cache.COPYING_AFTER - 1)}
    assert len(cache) == 1
    _call(cache, torch.randn(_LARGE), torch.empty(_LARGE), key="other")  # another key is another shape
    assert cache.counts["eager"] == graph_cache.COPYING_AFTER


def test_direct_graphs_in_use_are_never_evicted_stale_ones_make_room(cache):
    tensors = {name: (torch.randn(_LARGE), torch.empty(_LARGE)) for name in "abc"}
    for name in "ab":  # two direct graphs: the cache's max_direct
        for _ in range(2):
            _call(cache, *tensors[name])
    assert cache.counts["captures"] == 2
    for _ in range(2):  # c repeats its addresses, but a and b are in use: c must not evict them
        _call(cache, *tensors["c"])
    # c is the shape's third address set: it runs on the copying graph instead
    assert cache.counts["copying"] == 2 and len(cache._direct) == 2 and (cache.counts["captures"] == 3)
    for _ in range(2 * cache.max_direct + 1):  # b stays in use, a goes stale
        _call(cache, *tensors["b"])
    _call(cache, *tensors["c"])
    assert cache.counts["captures"] == 4 and len(cache._direct) == 2 and cache.counts["copying"] == 2
    before = cache.counts["direct"]
    _call(cache, *tensors["b"])  # b kept its graph
    assert cache.counts["direct"] == before + 1


def test_graphed_false_runs_the_function_and_counts_nothing(cache):
    x, out = torch.randn(_LARGE), torch.empty(_LARGE)
    for _ in range(3):
        cache("k", _double, (x,), (out,), graphed=False)
    assert torch.equal(out, 2 * x) and not cache.counts and not len(cache)


def _scale(x, w, out):
    out.copy_(w.sum() * x)


def test_small_tensors_at_new_addresses_keep_the_direct_graph(cache):
    """A small tensor (under STAGED_BYTES: the allocator's small blocks, which other work moves) at a
    new address every call: the direct graph of the large ones replays, copying the small one in."""
    x, out = torch.randn(_LARGE), torch.empty(_LARGE)
    weights = [torch.randn(_SMALL) for _ in range(5)]  # all alive: five addresses
    for w in weights:
        cache("k", _scale, (x, w), (out,))
        assert torch.equal(out, w.sum() * x)
    assert dict(cache.counts) == {"eager": 1, "captures": 1, "direct": 4}
