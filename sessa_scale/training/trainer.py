"""The training loop: DeepSpeed engine, AdamW + warmup/cosine, gradient accumulation,
periodic evaluation, metrics, and checkpoints that resume bit-exactly."""

from __future__ import annotations

import contextlib
import math
import os
import random
import time

import torch

from sessa_scale.checkpoint import CheckpointManager
from sessa_scale.checkpoint.universal import ensure_universal, needs_universal, saved_layout
from sessa_scale.config import Config, config_to_dict, save_config
from sessa_scale.data.setup import build_training_data
from sessa_scale.distributed import all_reduce_mean, device_for_rank, init_distributed, is_rank0, world_size
from sessa_scale.distributed.groups import MegatronMPU, init_model_parallel, tensor_parallel_group
from sessa_scale.distributed.tp_plan import universal_checkpoint_info
from sessa_scale.metrics import MetricsLogger, Progress, peak_bf16_flops, peak_memory_gib, throughput
from sessa_scale.models.registry import build_model, count_parameters, count_training_flops
from sessa_scale.training.compile import compile_for_training, eager_forward
from sessa_scale.training.nonfinite import NonFiniteSteps, skip_update_if_nonfinite
from sessa_scale.training.optimizer import (
    apply_hyperparameters,
    build_optimizer,
    build_scheduler,
    restore_implementation,
)
from sessa_scale.training.preemption import PreemptionHandler
from sessa_scale.training.resume import plan_resume


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def deepspeed_config(cfg: Config, dp_size: int, load_universal: bool = False) -> dict:
    t = cfg.train
    zero = {"stage": cfg.zero.stage}
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }


def autocast_context(cfg: Config, device: torch.device):
    """bf16 autocast (fp32 weights and optimizer state) or plain fp32."""
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def lm_loss(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; inputs, targets: (B, T) int64 (vocab-parallel under TP)."""
    return model(inputs, targets)


def _global_grad_norm(model: torch.nn.Module, tp_group) -> float:
    """2-norm of the whole model's gradient: TP shards summed over the TP group, replicated
    parameters counted once."""
    # accumulated on the gradients' device in float64, in parameter order (the same sums as a CPU
    # accumulation), with one host sync at the end instead of one per parameter
    device = next((p.grad.device for p in model.parameters() if p.grad is not None), torch.device("cpu"))
    sq = {k: torch.zeros((), dtype=torch.float64, device=device) for k in (True, False)}
    for p in model.parameters():
        if p.grad is not None:
            sq[bool(getattr(p, "tensor_model_parallel", False))] += p.grad.detach().double().square().sum()
    if tp_group is not None and tp_group.size() > 1:
        sharded = sq[True].to(device_for_rank())
        torch.distributed.all_reduce(sharded, group=tp_group)
        sq[True] = sharded.to(device)
    return math.sqrt((sq[True] + sq[False]).item())


@torch.no_grad()
def evaluate(engine, batches, cfg: Config, device: torch.device) -> float:
    engine.eval()
    with autocast_context(cfg, device), eager_forward():  # train.compile: no second compilation for eval
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
    if tp_group is not None:
        from sessa_scale.distributed.tensor_parallel import parallelize

        model = parallelize(model, tp_group, layout.sequence_parallel)
    model = model.to(device)
    optimizer = build_optimizer(model, cfg.optim, cpu_offload=cfg.zero.offload_optimizer)
    scheduler = build_scheduler(optimizer, cfg.optim, t.max_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, dp_size, load_universal=universal is not None),
        mpu=MegatronMPU(),
    )

    if t.compile:
        compile_for_training(engine)  # in place: state-dict keys and checkpoints as eager
    step, tokens = 0, 0
    if resume_from is not None:
        client = checkpoints.load(engine, resume_from, universal)
        restore_implementation(optimizer)  # fused on CUDA whatever the checkpoint was saved with
        apply_hyperparameters(optimizer, scheduler, cfg.optim)  # this config's lr schedule and AdamW settings
        step, tokens = client["step"], client["tokens"]
        stream.load_state_dict(client["data"])
    if is_rank0():
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")

    logger = MetricsLogger(cfg, is_rank0(), step)
    progress = Progress(t.max_steps, step, is_rank0() and cfg.logging.progress)
    progress.write(
        f"sessa-scale: {cfg.model.arch}, {count_parameters(cfg.model).total:,} parameters, "
        f"{world_size()} rank(s) on {device.type} (tensor {layout.tp}{' + sequence' if layout.sequence_parallel else ''}"
        f" x data {dp_size}, ZeRO {cfg.zero.stage}); data: {data.description}; run dir: {cfg.run_dir}"
        + ("; torch.compile (the first step compiles)" if t.compile else "")
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
        client = {"step": step, "tokens": tokens, "data": stream.state_dict(), "universal_checkpoint_info": universal_info}
        layout_meta = {"tensor": layout.tp, "data": dp_size}
        checkpoints.save(engine, step, client, {"config": config_to_dict(cfg), "parallel": layout_meta, "tokenizer": data.tokenizer})
        last_saved = step

    while step < t.max_steps:
        t0 = time.perf_counter()
        lr = scheduler.get_last_lr()[0]
        micro_losses, grad_norm, dropped = [], None, False
        for inputs, targets in stream.next_step():
            with autocast_context(cfg, device):
                loss = lm_loss(engine, inputs.to(device), targets.to(device))
            engine.backward(loss)
            micro_losses.append(loss.item())
            if engine.is_gradient_accumulation_boundary() and cfg.zero.stage == 0:
                grad_norm = _global_grad_norm(engine.module, tp_group)  # averaged, before clipping
                dropped = skip_update_if_nonfinite(engine, grad_norm)  # a NaN/inf step changes nothing
            engine.step()
        if grad_norm is None:
            grad_norm = float(engine.get_global_grad_norm() or 0.0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_time = time.perf_counter() - t0
        step += 1
        tokens += tokens_per_step
        last_loss = all_reduce_mean(sum(micro_losses) / len(micro_losses), device)
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
            "peak_mem_gib": peak_memory_gib(device),  # rank 0's
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

