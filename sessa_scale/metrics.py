"""Training metrics: one JSON object per optimizer step in RUN_DIR/metrics.jsonl, optional
Weights & Biases and TensorBoard (RUN_DIR/tensorboard/) with the same values, a progress display
(a tqdm bar on a terminal, periodic lines otherwise), and throughput: tokens/s/GPU, model
TFLOP/s/GPU and MFU (from sessa_scale.models.flops and the peak bf16 table below), peak memory."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sessa_scale.config import Config, config_to_dict
from sessa_scale.errors import UserError
from sessa_scale.filesystem import cause_of, file_system_error


# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets, matched against
# torch.cuda.get_device_name() in this order (most specific first). A GPU not listed gets no MFU.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.05),
    ("L4", 121.0),
)


def peak_bf16_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one `device`, or None when unknown (CPUs, unlisted GPUs)."""
    return peak_bf16_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def peak_bf16_flops_of(gpu_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the GPU model named `gpu_name` (as CUDA reports it), or None."""
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in gpu_name), None)


def throughput(tokens: int, seconds: float, world: int, flops_per_token: float, peak: float | None) -> dict:
    """tokens processed by all `world` ranks in `seconds` -> tokens/s (total and per GPU), model
    TFLOP/s per GPU and MFU (None without a known peak)."""
    per_gpu = tokens / seconds / world
    achieved = per_gpu * flops_per_token
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_s_per_gpu": per_gpu,
        "tflops_per_gpu": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
    }


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPUs, resident set size on CPUs."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (left by a run that crashed after its last checkpoint), so a
    resumed run's metrics.jsonl reads like an uninterrupted one."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Writes metrics on rank 0; a no-op on other ranks."""

    def __init__(self, cfg: Config, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = cfg.run_dir / "metrics.jsonl"
        self.wandb = self.tensorboard = None
        if not enabled:
            return
        _truncate_after(self.path, start_step)
        self.file = open(self.path, "a")
        if cfg.logging.tensorboard:
            self.tensorboard = _tensorboard_writer(cfg.run_dir / "tensorboard", start_step)
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project,
                name=cfg.run.name,
                dir=str(cfg.run_dir),
                mode=cfg.logging.wandb_mode,
                config=config_to_dict(cfg),
                resume="allow",
            )

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as exc:
            raise file_system_error(
                self.path, "append to", cause_of(exc),
                f"Training stopped at step {record['step']} without saving; the run's last checkpoint is intact: fix "
                "the cause and run the same command again to resume from it.",
            ) from None
        scalars = {k: v for k, v in record.items() if k != "step" and v is not None}
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, record["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.wandb is not None:
                self.wandb.finish()
            if self.tensorboard is not None:
                self.tensorboard.close()


def _tensorboard_writer(log_dir: Path, start_step: int):
    """A TensorBoard SummaryWriter on log_dir; a resumed run (start_step > 0) purges the events a
    crashed run wrote after its checkpoint, as metrics.jsonl drops them."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            'logging.tensorboard=true needs the tensorboard package: pip install -e ".[tensorboard]" '
            "(or set logging.tensorboard=false)"
        ) from None
    return SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)


class Progress:
    """A tqdm bar with loss, tokens/s and ETA when stderr is a terminal; otherwise a plain line
    about every 5% of the run (readable in batch-job logs)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.enabled, self.total, self.start_step = enabled, total, initial
        self.tty = sys.stderr.isatty()
        self.every = max(1, total // 20)
        self.t0 = time.time()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True) if enabled and self.tty else None

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            elapsed = time.time() - self.t0
            eta = elapsed / max(1, step - self.start_step) * (self.total - step)
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                f"elapsed {elapsed:.0f}s  eta {eta:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def write(self, message: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else lambda m: print(m, file=sys.stderr, flush=True))(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
