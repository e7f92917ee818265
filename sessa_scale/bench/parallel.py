"""`sessa-scale bench parallel`: one GPU against two, as data parallel (ZeRO-1, 2 and 3) and as tensor +
sequence parallel, and 2-GPU runs resumed on one GPU; same model, global batch, seed and data.

Every layout is a real training run (`torchrun -m sessa_scale train CONFIG ...`; NCCL with NVLink
multicast off, NCCL_NVLS_ENABLE=0) of --steps optimizer steps of micro_batch_size x 2 sequences:

    1 GPU              the reference: 2 accumulated micro-batches per step, ZeRO-1
    1 GPU fp32         the same at train.precision=fp32: measures the bf16 noise bound (below)
    dp=2 ZeRO-1/2/3    data parallel over 2 GPUs, one micro-batch each
    tp=2+SP            tensor + sequence parallel over 2 GPUs, 2 accumulated micro-batches, ZeRO-1
    tp=2+SP -> 1 GPU   the tp=2+SP run's checkpoint at step --resume-at, resumed on 1 GPU through
                       DeepSpeed's universal checkpoint (re-split weights and optimizer states)
    dp=2 -> 1 GPU      the same from the dp=2 ZeRO-1 run

The layouts table reports, from each run's metrics.jsonl: the largest |loss - 1-GPU loss| over all
steps; median tokens/s/GPU, TFLOP/s/GPU and MFU over the steps after --warmup (the profiled step
left out); tokens/s/GPU over the 1-GPU figure (for dp=2 this is the DP scaling efficiency, dp=2
tokens/s over 2 x the 1-GPU tokens/s); peak memory (rank 0); and, from rank 0's torch.profiler trace
of step --profile-step (train.profile_step; sessa_scale/bench/communication.py), the share of that
step's wall time during which a collective (NCCL kernel) runs, and the part of it not overlapped by
any other GPU work (exposed). The resumes table reports the largest |loss - 1-GPU loss| over the
continued steps, and against the uninterrupted run that wrote the checkpoint. Only the runs a resume
starts from save checkpoints (at --resume-at and at the end); the others run with checkpoint.save=false.

bf16 noise bound. A parallel layout computes the same sums as one GPU, split and reduced in another
order, so in bf16 its matmul outputs and reductions are rounded differently: its loss curve differs
from the 1-GPU one by rounding, not by any difference in the math. How far bf16 rounding moves a
loss curve over these steps is measured, not assumed: delta = max over steps of |1-GPU bf16 loss -
1-GPU fp32 loss| (the 1 GPU fp32 layout). Each bf16 run is taken to lie within delta of the fp32
curve of the same computation (its rounding is of the same kind and size as the 1-GPU run's), so two
bf16 runs lie within 2 x delta of each other (triangle inequality): bound = 2 x delta. A layout
within the bound matches one GPU to bf16 noise; one outside it differs by more than rounding. In fp32
(--precision fp32) the bound is not measured. The bound is specific to the run's steps, model and
data; it grows with the number of steps (rounding differences are amplified by training).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sessa_scale.distributed.process_group import free_port
from sessa_scale.errors import UserError


@dataclass(frozen=True)
class Layout:
    gpus: int
    slug: str  # run directory name under --out
    overrides: tuple[str, ...]
    resumes: str | None = None  # the layout whose checkpoint at --resume-at this run resumes


_ONE_GPU = ("train.grad_accum_steps=2", "zero.stage=1")
_SP = ("parallel.tensor=2", "parallel.sequence_parallel=true")
REFERENCE, NOISE_REFERENCE = "1 GPU", "1 GPU fp32"
LAYOUTS = {
    REFERENCE: Layout(1, "gpu1", _ONE_GPU),
    NOISE_REFERENCE: Layout(1, "gpu1_fp32", _ONE_GPU),
    "dp=2 ZeRO-1": Layout(2, "dp2_zero1", ("train.grad_accum_steps=1", "zero.stage=1")),
    "dp=2 ZeRO-2": Layout(2, "dp2_zero2", ("train.grad_accum_steps=1", "zero.stage=2")),
    "dp=2 ZeRO-3": Layout(2, "dp2_zero3", ("train.grad_accum_steps=1", "zero.stage=3")),
    "tp=2+SP": Layout(2, "tp2_sp", (*_ONE_GPU, *_SP)),
    "tp=2+SP -> 1 GPU": Layout(1, "tp2_sp_to_gpu1", _ONE_GPU, resumes="tp=2+SP"),
    "dp=2 -> 1 GPU": Layout(1, "dp2_to_gpu1", _ONE_GPU, resumes="dp=2 ZeRO-1"),
}


def selected_layouts(requested: list[str], precision: str) -> list[str]:
    """The requested layouts plus what they need (the 1-GPU reference, the runs resumes start from),
    in LAYOUTS order; without the fp32 noise reference when every run is fp32 anyway."""
    needed = set(requested) | {REFERENCE} | {LAYOUTS[n].resumes for n in requested if LAYOUTS[n].resumes}
    if precision == "fp32":
        needed.discard(NOISE_REFERENCE)
    return [n for n in LAYOUTS if n in needed]


def checkpoint_at(run_dir: Path, step: int) -> Path:
    """The checkpoint directory of `run_dir` saved at `step`."""
    from sessa_scale.checkpoint.manager import META, CheckpointManager, read_meta

    checkpoints = CheckpointManager(run_dir, keep=1).dir
    for candidate in sorted(checkpoints.glob("step_*")):
        if (candidate / META).is_file() and read_meta(candidate)["step"] == step:
            return candidate
    raise FileNotFoundError(f"{checkpoints} holds no checkpoint of step {step}")


def train_command(name: str, args, out: Path, sources: set[str]) -> list[str]:
    """The torchrun command line of one layout's run."""
    layout = LAYOUTS[name]
    precision = "fp32" if name == NOISE_REFERENCE else args.precision
    if layout.resumes:
        start = [f"train.resume={checkpoint_at(out / LAYOUTS[layout.resumes].slug, args.resume_at)}", "train.profile_step=0"]
    else:
        start = ["train.resume=none", f"train.profile_step={args.profile_step}"]
    saves = [f"checkpoint.interval={args.resume_at}", f"checkpoint.keep={args.steps}"] if name in sources else ["checkpoint.save=false"]
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={layout.gpus}", f"--master-port={free_port()}",
        "-m", "sessa_scale", "train", args.config, f"run.dir={out / layout.slug}", *start, *saves,
        f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch_size}", f"train.max_steps={args.steps}",
        f"train.precision={precision}", "train.eval_interval=0", "logging.progress=false", *layout.overrides, *args.set,
    ]  # fmt: skip


def read_communication(run_dir: Path, step: int) -> dict | None:
    """The communication share of `step` from rank 0's trace (None when the step was not profiled)."""
    from sessa_scale.bench.communication import communication_summary, read_trace
    from sessa_scale.training.profiling import trace_path

    trace = trace_path(run_dir, step)
    return communication_summary(read_trace(trace)) if trace.is_file() else None


def _max_diff(records: list[dict], ref: dict[int, float]) -> float:
    return max(abs(r["loss"] - ref[r["step"]]) for r in records if r["step"] in ref)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def noise_bound(metrics: dict[str, list[dict]]) -> float | None:
    """2 x max |1-GPU bf16 loss - 1-GPU fp32 loss| (module docstring), or None without both runs."""
    if REFERENCE not in metrics or NOISE_REFERENCE not in metrics:
        return None
    return 2 * _max_diff(metrics[NOISE_REFERENCE], {r["step"]: r["loss"] for r in metrics[REFERENCE]})


def summarize(metrics: dict[str, list[dict]], communication: dict[str, dict | None], warmup: int, profile_step: int) -> str:
    """Markdown tables from each run's per-step records (`metrics`, by layout name; REFERENCE
    required) and rank-0 profile summaries (`communication`); failed runs are left out of `metrics`."""
    ref = {r["step"]: r["loss"] for r in metrics[REFERENCE]}
    bound = noise_bound(metrics)

    def verdict(diff: float) -> str:
        return "n/a" if bound is None else ("yes" if diff <= bound else "NO")

    lines = [
        "| layout | GPUs | max abs loss diff vs 1 GPU | within bf16 bound | tokens/s/GPU | vs 1 GPU | TFLOP/s/GPU | MFU "
        "| peak memory (GiB) | communication share of step | exposed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tok = {}
    for name, records in metrics.items():
        if LAYOUTS[name].resumes:
            continue
        timed = [r for r in records if r["step"] > warmup and r["step"] != profile_step] or records
        tok[name] = statistics.median(r["tokens_per_s_per_gpu"] for r in timed)
        tflops = statistics.median(r["tflops_per_gpu"] for r in timed)
        mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
        mfu = f"{100 * statistics.median(mfus):.1f}%" if mfus else "n/a (unknown GPU)"
        diff = _max_diff(records, ref)
        within = "(reference)" if name in (REFERENCE, NOISE_REFERENCE) else verdict(diff)
        comm = communication.get(name) or {}
        lines.append(
            f"| {name} | {LAYOUTS[name].gpus} | {diff:.2e} | {within} | {tok[name]:,.0f} | {tok[name] / tok[REFERENCE]:.1%} "
            f"| {tflops:.1f} | {mfu} | {max(r['peak_mem_gib'] for r in records):.1f} "
            f"| {_share(comm.get('communication_share'))} | {_share(comm.get('exposed_share'))} |"
        )
    lines.append("")
    lines.append(
        "bf16 noise bound (2 x max |1-GPU bf16 loss - 1-GPU fp32 loss|): "
        + (f"{bound:.2e}" if bound is not None else "not measured (no 1 GPU fp32 run, or the runs are fp32)")
    )
    resumes = [n for n in metrics if LAYOUTS[n].resumes]
    if resumes:
        lines += [
            "",
            "| resume | continued steps | max abs loss diff vs 1 GPU | within bf16 bound | vs the run it resumed |",
            "|---|---|---|---|---|",
        ]
        for name in resumes:
            records, source = metrics[name], metrics[LAYOUTS[name].resumes]
            steps = [r["step"] for r in records]
            diff = _max_diff(records, ref)
            own = _max_diff(records, {r["step"]: r["loss"] for r in source})
            lines.append(f"| {name} | {min(steps)}-{max(steps)} | {diff:.2e} | {verdict(diff)} | {own:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from sessa_scale.bench import emit_report
    from sessa_scale.evaluation.report import load_run

    p = argparse.ArgumentParser(prog="sessa-scale bench parallel", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/sessa/350m.yaml")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the throughput medians")
    p.add_argument("--profile-step", type=int, default=None,
                   help="step profiled for the communication share (default: warmup + 1; 0: none)")
    p.add_argument("--resume-at", type=int, default=None,
                   help="checkpoint step the resume layouts start from (default: steps // 2)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="train.precision of every run but the fp32 noise reference")
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS), metavar="LAYOUT",
                   help=f"any of {', '.join(repr(n) for n in LAYOUTS)} (default: all); "
                   "the 1-GPU reference and the runs a resume starts from are added")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, after the layout's (e.g. zero.reduce_bucket_size=20000000)")
    p.add_argument("--out", default="runs/bench_parallel", help="parent of the run directories (must not hold them yet)")
    p.add_argument("--report", default=None, help="also write the report (Markdown) to this file")
    args = p.parse_args(argv)
    args.profile_step = args.warmup + 1 if args.profile_step is None else args.profile_step
    args.resume_at = args.steps // 2 if args.resume_at is None else args.resume_at
    names = selected_layouts(args.layouts, args.precision)
    out = Path(args.out)
    _check_arguments(args, names, out)

    sources = {LAYOUTS[n].resumes for n in names if LAYOUTS[n].resumes}
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    command = f"sessa-scale bench parallel {shlex.join(sys.argv[1:] if argv is None else argv)}"
    metrics, communication, failed = {}, {}, {}
    for name in names:
        source = LAYOUTS[name].resumes
        if source in failed:
            failed[name] = f"not run: {source} failed"
            continue
        cmd = train_command(name, args, out, sources)
        print(f"# {name}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            failed[name] = f"exit status {rc}"
        else:
            metrics[name] = load_run(out / LAYOUTS[name].slug).metrics
            communication[name] = read_communication(out / LAYOUTS[name].slug, args.profile_step)
        if args.report:  # a partial report after every run: a bench cut short by a time limit still leaves one
            done = f"partial: {len(metrics) + len(failed)} of {len(names)} runs"
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(render_report(args, command, done, metrics, communication, failed))

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    emit_report(render_report(args, command, device, metrics, communication, failed), args.report)
    return 1 if failed else 0


def render_report(args, command: str, device: str, metrics: dict, communication: dict, failed: dict) -> str:
    """The report: one header line (config, sizes, `device`, date, command), the tables, failed runs."""
    header = (
        f"{args.config}, T={args.seq_len}, micro-batch {args.micro_batch_size} (x 2 per step), {args.precision}, "
        f"{args.steps} steps (throughput: median of steps > {args.warmup}, without the profiled step {args.profile_step}; "
        f"resumes from step {args.resume_at}), {device}, {datetime.date.today()}; command: {command}"
    )
    body = summarize(metrics, communication, args.warmup, args.profile_step) if REFERENCE in metrics else "(no 1-GPU reference run)"
    notes = "".join(f"\n{name}: {why}" for name, why in failed.items())
    return f"{header}\n\n{body}\n{notes}"


def _check_arguments(args, names: list[str], out: Path) -> None:
    problems = []
    if args.steps < 2:
        problems.append(f"--steps {args.steps}: needs at least 2 steps")
    if not 0 <= args.profile_step <= args.steps:
        problems.append(f"--profile-step {args.profile_step}: must be 0 (no profile) or a step in 1..{args.steps}")
    resuming = any(LAYOUTS[n].resumes for n in names)
    if resuming and not 1 <= args.resume_at < args.steps:
        problems.append(f"--resume-at {args.resume_at}: must be a step in 1..{args.steps - 1} for the resume layouts")
    if resuming and args.profile_step == args.resume_at:
        problems.append(f"--profile-step {args.profile_step}: the checkpoint of --resume-at is saved in that step; profile another step")
    existing = [str(out / LAYOUTS[n].slug) for n in names if (out / LAYOUTS[n].slug).exists()]
    if existing:
        problems.append(f"{', '.join(existing)} already exist (an earlier bench run); pass a new --out or move them away")
    if problems:
        raise UserError("bench parallel: " + "; ".join(problems) + ".")
