"""The training loop: DeepSpeed engine, AdamW + warmup/cosine, gradient accumulation,
periodic evaluation, metrics, and checkpoints that resume bit-exactly."""

from __future__ import annotations

import os
import random
import time

import torch

from sessa_scale.checkpoint import CheckpointManager
from sessa_scale.checkpoint.universal import ensure_universal, needs_universal, saved_layout
from sessa_scale.config import Config, config_to_dict, save_config
from sessa_scale.data.loader import inputs_and_targets
from sessa_scale.data.setup import build_training_data
from sessa_scale.distributed import all_reduce_mean, device_for_rank, init_distributed, is_rank0, world_size
from sessa_scale.distributed.groups import MegatronMPU, init_model_parallel, tensor_parallel_group
from sessa_scale.distributed.tp_plan import universal_checkpoint_info
from sessa_scale.metrics import MetricsLogger, Progress, peak_bf16_flops, peak_memory_gib, throughput
from sessa_scale.models.registry import build_model, count_parameters, count_training_flops
from sessa_scale.training.compile import compile_for_training, eager_forward
from sessa_scale.training.cuda_graphs import capture_graphs
from sessa_scale.training.nonfinite import NonFiniteSteps, skip_update_if_nonfinite
from sessa_scale.training.optimizer import (
    apply_hyperparameters,
    build_optimizer,
    build_scheduler,
    restore_implementation,
)
from sessa_scale.training.precision import deepspeed_precision_config
from sessa_scale.training.profiling import phase, profile_step
from sessa_scale.training.preemption import PreemptionHandler
from sessa_scale.training.resume import plan_resume
from sessa_scale.training.zero_communication import zero_communication_config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def deepspeed_config(cfg: Config, dp_size: int, device: torch.device, load_universal: bool = False) -> dict:
    """The DeepSpeed config of a run: batch sizes, ZeRO, precision (training/precision.py) and clipping.

    At ZeRO stage 0 the trainer clips gradients itself (clip_gradients: one fused norm, the norm it
    logs), so DeepSpeed's per-parameter clipping is off there; ZeRO 1-3 clip in their optimizers."""
    t = cfg.train
    zero = {"stage": cfg.zero.stage, **zero_communication_config(cfg)}
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_size,
        "gradient_clipping": cfg.optim.grad_clip if cfg.zero.stage > 0 else 0.0,
        "zero_optimization": zero,
        **deepspeed_precision_config(t.precision, device),
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def skip_identity_allreduce(engine, zero_stage: int, dp_size: int) -> None:
    """At ZeRO stage 0 with one data-parallel rank, turn DeepSpeed's gradient all-reduce after the
    backward pass off: it is the identity there, yet flattens every gradient into one buffer (a cat
    of all the model's float32 gradients) and copies each back (one copy kernel per parameter and
    step: 17 per Mamba-2 layer), launches the host issues while the GPU waits."""
    if zero_stage == 0 and dp_size == 1:
        engine.enable_backward_allreduce = False


def set_deterministic(enabled: bool) -> None:
    """`train.deterministic`: deterministic algorithms everywhere torch has them (embedding and
    scatter backward, cuBLAS with a fixed workspace, cuDNN without autotuning), so that a resumed
    run repeats an uninterrupted one bitwise on GPUs too. Must run before the first cuBLAS call."""
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; inputs, targets: (B, T) int64 (vocab-parallel under TP)."""
    return model(inputs, targets)


def device_batch(block: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's token block (B, T + 1) (pinned on CUDA) -> contiguous inputs and targets (B, T)
    on device: one asynchronous copy of the whole block, then two device copies. The trainer used to
    copy the two non-contiguous views instead; in the H200 trace of a compiled step the host sat in that
    copy at each micro-step while the GPU drained, leaving it idle ~18 ms per micro-step."""
    inputs, targets = inputs_and_targets(block.to(device, non_blocking=True))
    return inputs.contiguous(), targets.contiguous()


def clip_gradients(model: torch.nn.Module, max_norm: float, tp_group) -> torch.Tensor:
    """Clip the whole model's gradient to 2-norm `max_norm` (0: no clipping) and return its norm
    before clipping, as a 0-dim float32 tensor on the gradients' device (no host sync).

    TP-sharded gradients' squared norms are summed over the TP group, replicated parameters counted
    once. torch._foreach_norm: a few fused kernels for all parameters (DeepSpeed's stage-0 clipping
    launches two per parameter). The clip factor is min(1, max_norm / (norm + 1e-6)), as DeepSpeed's."""
    grads = {True: [], False: []}
    for p in model.parameters():
        if p.grad is not None:
            grads[bool(getattr(p, "tensor_model_parallel", False))].append(p.grad)
    device = next(g.device for gs in grads.values() for g in gs)

    def sum_sq(gs: list[torch.Tensor]) -> torch.Tensor:
        if not gs:
            return torch.zeros((), dtype=torch.float32, device=device)
        return torch.stack(torch._foreach_norm(gs)).float().square().sum()

    sharded = sum_sq(grads[True])
    if tp_group is not None and tp_group.size() > 1:
        sharded = sharded.to(device_for_rank())
        torch.distributed.all_reduce(sharded, group=tp_group)
        sharded = sharded.to(device)
    norm = (sharded + sum_sq(grads[False])).sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for gs in grads.values():
            if gs:
                torch._foreach_mul_(gs, coef.to(gs[0].dtype))
    return norm


@torch.no_grad()
def evaluate(engine, batches, cfg: Config, device: torch.device) -> float:
    engine.eval()
    with eager_forward():  # train.compile: no second compilation for eval; precision: the engine's
        losses = [lm_loss(engine, x.to(device), y.to(device)).item() for x, y in batches]
    engine.train()
    return all_reduce_mean(sum(losses) / len(losses), device)


def train(cfg: Config) -> dict:
    """Train according to `cfg`; returns a summary (steps, first/last loss, val loss, wall time, and
    `preempted`: why training stopped before train.max_steps, or None). SIGUSR1/SIGTERM stop it
    after the current step with a checkpoint (training/preemption.py)."""
    preemption = PreemptionHandler()
    try:
        return _train(cfg, preemption)
    finally:
        preemption.restore()


def _train(cfg: Config, preemption: PreemptionHandler) -> dict:
    wall_start = time.time()
    set_deterministic(cfg.train.deterministic)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if cfg.parallel.tensor > 1:  # megatron: keeps TP/SP communication ordered ahead of compute (set before CUDA starts)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    init_distributed()
    import deepspeed

    layout = init_model_parallel(cfg.parallel.tensor, cfg.parallel.sequence_parallel, cfg.run.seed)
    device, dp_rank, dp_size = device_for_rank(), layout.dp_rank, layout.dp
    tp_group = tensor_parallel_group() if layout.tp > 1 else None
    seed_everything(cfg.run.seed)
    checkpoints = CheckpointManager(cfg.run_dir, cfg.checkpoint.keep)
    resume_from = plan_resume(cfg, dp_size)  # says which checkpoint, why, and every config change
    universal = None
    if resume_from is not None and needs_universal(resume_from, layout.tp, dp_size, cfg.zero.stage):
        universal = ensure_universal(resume_from)

    t = cfg.train
    data = build_training_data(cfg, dp_rank, dp_size, pin_memory=device.type == "cuda")
    stream, val_set = data.train, data.val_batches

    model = build_model(cfg.model)  # the full model from run.seed on every rank, then split
    if cfg.model.init_from and resume_from is None:
        from sessa_scale.hf.export import init_from_export

        init_from_export(model, cfg.model, data.tokenizer)
    if tp_group is not None:
        from sessa_scale.distributed.tensor_parallel import parallelize

        model = parallelize(model, tp_group, layout.sequence_parallel)
    model = model.to(device)
    optimizer = build_optimizer(model, cfg.optim, cpu_offload=cfg.zero.offload_optimizer)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dp_size, device, load_universal=universal is not None),
        mpu=MegatronMPU(),
    )
    skip_identity_allreduce(engine, cfg.zero.stage, dp_size)

    if t.compile:
        compile_for_training(engine, t.compile_mode)  # in place: state-dict keys and checkpoints as eager
    step, tokens = 0, 0
    if resume_from is not None:
        client = checkpoints.load(engine, resume_from, universal)
        restore_implementation(optimizer)  # fused on CUDA whatever the checkpoint was saved with
        apply_hyperparameters(optimizer, scheduler, cfg.optim)  # this config's lr schedule and AdamW settings
        step, tokens = client["step"], client["tokens"]
        stream.load_state_dict(client["data"])
    graphs_note, graph_pool_bytes = capture_graphs(engine.module, cfg, device)  # after any load: graphs read parameters in place
    if is_rank0():
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")

    logger = MetricsLogger(cfg, is_rank0(), step)
    progress = Progress(t.max_steps, step, is_rank0() and cfg.logging.progress)
    progress.write(
        f"sessa-scale: {cfg.model.arch}, {count_parameters(cfg.model).total:,} parameters, "
        f"{world_size()} rank(s) on {device.type} (tensor {layout.tp}{' + sequence' if layout.sequence_parallel else ''}"
        f" x data {dp_size}, ZeRO {cfg.zero.stage}); data: {data.description}; run dir: {cfg.run_dir}"
        + ("; torch.compile (the first step compiles)" if t.compile else "") + graphs_note
        + (f"; resumed from {resume_from} at step {step}" if resume_from else "")
        + (f" (re-split from {saved_layout(resume_from)} through {universal})" if universal else "")
    )
    tokens_per_step = stream.global_batch * cfg.data.seq_len
    flops_per_token, peak = count_training_flops(cfg.model, cfg.data.seq_len), peak_bf16_flops(device)
    universal_info = universal_checkpoint_info(cfg.model)  # lets a later run resume on other TP/DP sizes
    first_loss = last_loss = val_loss = None
    start_step = step
    last_saved = step if resume_from is not None else -1
    nonfinite = NonFiniteSteps(t.skip_nonfinite_steps)
    interval = cfg.checkpoint.interval

    def save() -> None:
        nonlocal last_saved
        if not cfg.checkpoint.save:
            return
        client = {"step": step, "tokens": tokens, "data": stream.state_dict(), "universal_checkpoint_info": universal_info}
        layout_meta = {"tensor": layout.tp, "data": dp_size}
        checkpoints.save(engine, step, client, {"config": config_to_dict(cfg), "parallel": layout_meta, "tokenizer": data.tokenizer})
        last_saved = step

    while step < t.max_steps:
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        with profile_step(step + 1, t.profile_step, cfg.run_dir, is_rank0(), device):
            loss_sum, grad_norm, dropped = None, None, None
            for block in stream.next_step():  # no host sync until the step's end
                with phase("forward"):
                    loss = lm_loss(engine, *device_batch(block, device))
                with phase("backward"):
                    engine.backward(loss)
                loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
                if engine.is_gradient_accumulation_boundary() and cfg.zero.stage == 0:
                    with phase("clip_gradients"):
                        grad_norm = clip_gradients(engine.module, cfg.optim.grad_clip, tp_group)  # averaged over DP
                    dropped = skip_update_if_nonfinite(engine, grad_norm)  # NaN/inf gradients change nothing
                with phase("optimizer_step"):
                    engine.step()
            grad_norm = float(grad_norm if grad_norm is not None else engine.get_global_grad_norm() or 0.0)
            micro_loss_mean = loss_sum.item() / t.grad_accum_steps
            if device.type == "cuda":
                torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        step += 1
        tokens += tokens_per_step
        last_loss = all_reduce_mean(micro_loss_mean, device)
        verdict = nonfinite.check(step, last_loss, grad_norm, dropped, engine, scheduler)  # {} for a finite step
        first_loss = last_loss if first_loss is None else first_loss
        record = {
            "step": step,
            "loss": last_loss,
            "lr": lr,
            "tokens": tokens,
            **throughput(tokens_per_step, step_time, world_size(), flops_per_token, peak),
            "grad_norm": grad_norm,
            "step_time_s": step_time,
            "peak_mem_gib": peak_memory_gib(device) + graph_pool_bytes / 2**30,  # rank 0's; with the graphs' pool
            **verdict,
        }
        if t.eval_interval and (step % t.eval_interval == 0 or step == t.max_steps):
            val_loss = record["val_loss"] = evaluate(engine, val_set, cfg, device)
            progress.write(f"step {step}: loss {last_loss:.4f}, val_loss {val_loss:.4f}")
        logger.log(record)
        nonfinite.stop_if_needed(checkpoints)  # after too many NaN/inf steps: stop, `latest` untouched
        progress.update(step, last_loss, record["tokens_per_s"])
        if (interval and step % interval == 0) or step == t.max_steps:
            save()
        if preemption.stop_requested(device):
            progress.write(f"step {step}: {preemption.reason}; saving a checkpoint and stopping")
            break
    if last_saved != step:
        save()
    stream.close()
    progress.close()
    logger.close()
    return {
        "start_step": start_step,
        "final_step": step,
        "first_loss": first_loss,
        "last_loss": last_loss,
        "val_loss": val_loss,
        "wall_s": time.time() - wall_start,
        "checkpoint": str(checkpoints.latest()),
        "preempted": preemption.reason if step < t.max_steps else None,
    }

