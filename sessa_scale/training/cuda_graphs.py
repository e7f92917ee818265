"""`train.cuda_graphs`: each decoder block's forward and backward replayed as CUDA graphs.

An eager step issues every kernel of every block from Python. For a model of many light blocks (the
350M Mamba-2: 46 blocks, ~40 launches each forward + backward) the host takes longer to issue a step
than the GPU takes to run it, and the GPU waits. Here every block of ``model.layers`` is captured once,
for the training micro-batch's shape, as two CUDA graphs (forward, backward); a training step then costs
the host two graph launches and two copies per block. The embedding, the head and the loss stay eager.

Capture (``capture_block_graphs``, after the engine is built and any checkpoint is loaded), as PyTorch
documents for graphed callables: one warm-up forward + backward per block on a side stream (kernel
compilation, library handles), then the forwards in layer order and the backwards in reverse order into
one shared memory pool, the order in which a step runs them, so that replays never overwrite memory
another graph still needs. Each block's graphs read its static input and its parameters in place and
write its static output and gradients.

A block runs its graphs only when it is training, gradients are on, and the input has the captured
shape, dtype and device; otherwise (evaluation, another shape) it runs eagerly. Parameters must stay in
the memory they were captured with (optimizers update them in place): a block whose parameters moved
raises instead of training on stale memory.

Gradients: the backward hands autograd the static gradient tensors themselves, still referenced by the
graph, so that autograd accumulates them into ``param.grad`` by copy or addition rather than adopting
the static tensor as ``param.grad``: an adopted tensor would be overwritten by the next replay, which
breaks gradient accumulation (``torch.cuda.make_graphed_callables`` returns detached static tensors,
PyTorch issue 181723, hence this module rather than that function).

Not combined with train.compile, model.activation_checkpointing, parallel.tensor > 1 or ZeRO stages 1-3
(``config_problems``); CUDA only (elsewhere the blocks run eagerly, with a note).
"""

from __future__ import annotations

import torch
from torch import nn

from sessa_scale.ops.graph_cache import CAPTURE_MODE  # other threads may call CUDA during a capture
from sessa_scale.training.precision import autocast

WARMUP_CALLS = 1  # eager forward + backward per block before capture: compiles Triton kernels, creates library
# handles (one call: the feedback solve's own graph cache captures on a second call of a shape)


def config_problems(cfg) -> list[tuple[str, bool, str]]:
    """(dotted key, ok, what is allowed) for the settings train.cuda_graphs cannot be combined with."""
    on = cfg.train.cuda_graphs
    return [
        ("train.compile", not (on and cfg.train.compile),
         "cannot be combined with train.cuda_graphs=true (choose one: set train.compile=false or train.cuda_graphs=false)"),
        ("model.activation_checkpointing", not (on and cfg.model.activation_checkpointing),
         "cannot be combined with train.cuda_graphs=true (a recomputed block would overwrite its captured "
         "activations); set one of them to false"),
        ("parallel.tensor", not (on and cfg.parallel.tensor > 1),
         "must be 1 with train.cuda_graphs=true (tensor-parallel communication is not captured); set "
         "train.cuda_graphs=false"),
        ("zero.stage", not (on and cfg.zero.stage != 0),
         "must be 0 with train.cuda_graphs=true (stage 3 gathers each parameter per use; stages 1 and 2, whose "
         "gradient hooks and flat parameter buffers the graphs would have to keep in place, are not tested with "
         "graphs on GPUs); set zero.stage=0 or train.cuda_graphs=false"),
    ]


class BlockGraphs:
    """One block's captured forward and backward, and the static tensors they read and write:
    input (B, T, D), output (B, T, D), output gradient (B, T, D), and the gradients of the input and of
    each trainable parameter (None where the parameter is unused)."""

    def __init__(self, block: nn.Module, sample: torch.Tensor):
        self.block = block
        self.params = tuple(p for p in block.parameters() if p.requires_grad)
        self.pointers = tuple(p.data_ptr() for p in self.params)
        self.input = sample.detach().clone().requires_grad_(True)
        self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.output = self.grad_output = None
        self.grads: tuple = ()

    def warm_up(self) -> None:
        """Eager forward + backward (torch.autograd.grad: nothing lands in param.grad)."""
        out = self.block(self.input)
        torch.autograd.grad(out, (self.input, *self.params), torch.randn_like(out), allow_unused=True)

    def capture_forward(self, pool) -> None:
        with torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode=CAPTURE_MODE):
            self.output = self.block(self.input)
        self.grad_output = torch.empty_like(self.output)

    def capture_backward(self, pool) -> None:
        with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode=CAPTURE_MODE):
            self.grads = torch.autograd.grad(self.output, (self.input, *self.params), self.grad_output,
                                             allow_unused=True)
        self.output = self.output.detach()  # the autograd graph of the capture is not kept

    def check_parameters(self) -> None:
        if tuple(p.data_ptr() for p in self.params) != self.pointers:
            raise RuntimeError(
                f"train.cuda_graphs: the parameters of {type(self.block).__name__} moved to other memory after "
                "their CUDA graphs were captured (something replaced param.data instead of updating it in place); "
                "the graphs would train on stale memory. Run with train.cuda_graphs=false.")


class _Replay(torch.autograd.Function):
    """A block's forward and backward as replays of its graphs (x (B, T, D) -> (B, T, D))."""

    @staticmethod
    def forward(ctx, graphs: BlockGraphs, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        if x.data_ptr() != graphs.input.data_ptr():
            graphs.input.copy_(x)
        graphs.forward_graph.replay()
        ctx.graphs = graphs
        return graphs.output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        graphs = ctx.graphs
        if grad_output.data_ptr() != graphs.grad_output.data_ptr():
            graphs.grad_output.copy_(grad_output)
        graphs.backward_graph.replay()
        return (None, *graphs.grads)  # the static tensors themselves: see the module docstring


def _graphed_forward(graphs: BlockGraphs, eager):
    """The block's forward: the replays for a training call of the captured shape, else eager."""
    block, like = graphs.block, graphs.input

    def forward(x: torch.Tensor) -> torch.Tensor:
        if (block.training and torch.is_grad_enabled() and x.shape == like.shape and x.dtype == like.dtype
                and x.device == like.device):
            graphs.check_parameters()
            return _Replay.apply(graphs, x, *graphs.params)
        return eager(x)

    return forward


def capture_block_graphs(model: nn.Module, tokens: torch.Tensor, autocast_context) -> list[BlockGraphs]:
    """Capture every block of model.layers (a DecoderLM) for micro-batches shaped like tokens (B, T) and
    replace each block's forward by its graphed forward (in place: the module tree, its parameters and
    state-dict keys are unchanged). autocast_context: a factory of the training step's autocast context, with its
    weight-cast cache off (a cached cast would be made outside the graphs). Returns the blocks' graphs."""
    with torch.no_grad(), autocast_context():
        sample = model.embed_tokens(tokens)  # the blocks' input: (B, T, D) in the residual stream's dtype
    blocks = [BlockGraphs(block, sample) for block in model.layers]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), autocast_context():
        for _ in range(WARMUP_CALLS):
            for graphs in blocks:
                graphs.warm_up()
    torch.cuda.synchronize()
    pool = torch.cuda.graph_pool_handle()
    with autocast_context():
        for graphs in blocks:
            graphs.capture_forward(pool)
        for graphs in reversed(blocks):
            graphs.capture_backward(pool)
    for graphs in blocks:
        graphs.block.forward = _graphed_forward(graphs, type(graphs.block).forward.__get__(graphs.block))
    return blocks


def unallocated_pool_bytes(device: torch.device) -> int:
    """Bytes that private memory pools (the CUDA graphs') hold reserved on device without a live tensor in
    them: the memory the replays write their activations and temporaries into, which
    torch.cuda.max_memory_allocated stops counting once the capture has freed those tensors."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return sum(s["total_size"] - s["allocated_size"] for s in torch.cuda.memory_snapshot()
               if s["device"] == index and tuple(s["segment_pool_id"]) != (0, 0))


def capture_graphs(model: nn.Module, cfg, device: torch.device) -> tuple[str, int]:
    """The trainer's use of train.cuda_graphs: capture model's blocks for the micro-batch (B, T) of cfg on
    a CUDA device. Returns the note for the start-up line (empty when the setting is off) and the bytes
    the graphs' pool holds beyond its live tensors (unallocated_pool_bytes; 0 without graphs), which the
    trainer adds to its peak-memory figure."""
    if not cfg.train.cuda_graphs:
        return "", 0
    if device.type != "cuda":
        return "; train.cuda_graphs ignored (no CUDA device: the blocks run eagerly)", 0
    tokens = torch.zeros((cfg.train.micro_batch_size, cfg.data.seq_len), dtype=torch.long, device=device)
    blocks = capture_block_graphs(model, tokens, lambda: autocast(cfg.train.precision, device, cache=False))
    pool = unallocated_pool_bytes(device)
    return (f"; CUDA graphs: {len(blocks)} blocks captured for micro-batches of {tuple(tokens.shape)} tokens "
            f"({pool / 2**30:.1f} GiB reserved for their activations)"), pool
