"""Resumable, blended, rank- and worker-partitioned streams over prepared datasets.

Positions are global (see order.py): optimizer step s of a stream that starts at position P
consumes positions [P + s * G, P + (s + 1) * G), G = micro_batch_size * grad_accum_steps *
dp_size, and data-parallel rank r takes micro-batch m from [P + s * G + (m * dp_size + r) * mb,
... + mb), the layout of gradient accumulation. Within a rank, DataLoader worker w of W builds
the rank's micro-batches w, w + W, w + 2W, ... and the DataLoader returns them in order, so
ranks and workers never read the same position and no position is skipped.

The state saved in checkpoints is the next global position (plus the seed, seq_len and the
identity of the sources, which must not change under a resumed run). What holds on resume:
- same layout: the exact samples of the uninterrupted run, in the same micro-batches;
- another number of DP ranks or another micro-batch/accumulation split with the same global
  batch: every optimizer step sees the same set of samples as the uninterrupted run (each rank a
  different share of it);
- another global batch: the global sample sequence continues exactly where it stopped, cut
  into steps of the new size.
"""

from __future__ import annotations

import hashlib
import signal
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sessa_scale.data.order import Blend, SourceOrder
from sessa_scale.data.reader import SampleReader, SplitInfo
from sessa_scale.errors import UserError


@dataclass
class StreamSpec:
    """What a stream reads: splits of one or more datasets with blend weights, and how it shuffles."""

    splits: list[SplitInfo]
    weights: list[float]
    seed: int = 0
    shuffle_buffer: int = 10_000
    shuffle: bool = True
    verify: bool = True
    names: list[str] = field(default_factory=list)

    def fingerprint(self) -> list[dict]:
        """Identity of each source (a hash of its shard checksums) and its weight."""
        out = []
        for info, weight in zip(self.splits, self.weights):
            digest = hashlib.sha256("".join(s["sha256"] for s in info.shards).encode()).hexdigest()[:16]
            out.append({"shards_sha256": digest, "weight": float(weight)})
        return out


class SampleSequence:
    """Random access to a stream's global positions. One per process."""

    def __init__(self, spec: StreamSpec):
        self.spec = spec
        self.blend = Blend(spec.weights, spec.seed, spec.shuffle)
        self.orders = [
            SourceOrder([s["samples"] for s in info.shards], spec.seed, i, spec.shuffle_buffer, spec.shuffle)
            for i, info in enumerate(spec.splits)
        ]
        self.readers = [SampleReader(info, spec.verify) for info in spec.splits]

    def sample_id(self, position: int) -> tuple[int, int]:
        """(source, sample key within its split) at a global position."""
        source, k = self.blend.assign(position)
        shard, offset = self.orders[source].locate(k)
        return source, int(self.readers[source].key_base[shard]) + offset

    def read(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [start, start + count): ids (count, 2) int64 as (source, key), tokens
        (count, seq_len + 1) int64."""
        ids = np.empty((count, 2), dtype=np.int64)
        rows = []
        for i in range(count):
            source, k = self.blend.assign(start + i)
            shard, offset = self.orders[source].locate(k)
            ids[i] = source, int(self.readers[source].key_base[shard]) + offset
            rows.append(self.readers[source].read(shard, offset))
        return torch.from_numpy(ids), torch.from_numpy(np.stack(rows).astype(np.int64))


class _RankMicroBatches(IterableDataset):
    """This rank's micro-batches from global position `start` on, split over DataLoader workers.
    Yields (ids, tokens), or ("error", message) after which it stops (so that a UserError in a
    worker reaches the user as one paragraph)."""

    def __init__(self, spec: StreamSpec, start: int, micro_batch_size: int, grad_accum_steps: int, dp_rank: int, dp_size: int):
        self.spec, self.start = spec, start
        self.mb, self.accum, self.dp_rank, self.dp_size = micro_batch_size, grad_accum_steps, dp_rank, dp_size

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        sequence = SampleSequence(self.spec)
        global_batch = self.mb * self.accum * self.dp_size
        k = worker
        while True:
            step, m = divmod(k, self.accum)
            first = self.start + step * global_batch + (m * self.dp_size + self.dp_rank) * self.mb
            try:
                yield sequence.read(first, self.mb)
            except UserError as exc:
                yield "error", str(exc)
                return
            k += workers


def _ignore_interrupts(_worker_id: int) -> None:
    """DataLoader workers ignore the stop signals (SIGINT, SIGTERM, SIGUSR1): a terminal's Ctrl-C reaches
    the whole process group, and SLURM's time limit, `scancel` and `timeout` send SIGTERM to every process
    of the job; the training process decides what they mean (training/preemption.py: finish the step,
    checkpoint), and its workers end with it."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def inputs_and_targets(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A token block (B, T + 1) -> inputs (B, T) and next-token targets (B, T): views, no copy."""
    return tokens[:, :-1], tokens[:, 1:]


class ShardStream:
    """Training batches for one data-parallel rank (the trainer calls `next_step()` once per
    optimizer step). num_workers = 0 reads in the calling process; > 0 uses that many DataLoader
    worker processes, each keeping `prefetch` micro-batches ready."""

    def __init__(
        self,
        spec: StreamSpec,
        micro_batch_size: int,
        grad_accum_steps: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        num_workers: int = 0,
        prefetch: int = 2,
        pin_memory: bool = False,
    ):
        self.spec = spec
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch, self.pin_memory = num_workers, prefetch, pin_memory
        self.global_batch = micro_batch_size * grad_accum_steps * dp_size
        self.seq_len = spec.splits[0].layout.sample_tokens - 1
        self.position = 0
        self.last_ids: list[torch.Tensor] = []
        self._iter = None

    def _start(self):
        dataset = _RankMicroBatches(
            self.spec, self.position, self.micro_batch_size, self.grad_accum_steps, self.dp_rank, self.dp_size
        )
        if self.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch,
            pin_memory=self.pin_memory,
            multiprocessing_context="fork",
            worker_init_fn=_ignore_interrupts,
        )
        return iter(loader)

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for the next optimizer step: token blocks (micro_batch_size,
        seq_len + 1) int64, contiguous (and pinned with pin_memory): `inputs_and_targets` splits one,
        and the trainer copies each whole to the device (training/trainer.device_batch says why).
        The sample ids go to `last_ids`."""
        if self._iter is None:
            self._iter = self._start()
        batches, self.last_ids = [], []
        for _ in range(self.grad_accum_steps):
            ids, tokens = next(self._iter)
            if isinstance(ids, str):
                self.close()
                raise UserError(tokens)
            self.last_ids.append(ids)
            batches.append(tokens.pin_memory() if self.pin_memory and not tokens.is_pinned() else tokens)
        self.position += self.global_batch
        return batches

    def close(self) -> None:
        """Stop the DataLoader workers (a later next_step() restarts them at the position)."""
        self._iter = None

    def state_dict(self) -> dict:
        return {
            "position": self.position,
            "seed": self.spec.seed,
            "seq_len": self.seq_len,
            "sources": self.spec.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        if "position" not in state:
            raise UserError(
                "the checkpoint's data position was written by an older sessa_scale data loader; resume it with "
                "that version, or start a fresh run (train.resume=none with a new run.name)"
            )
        saved = (state["seed"], state["seq_len"], state["sources"])
        now = (self.spec.seed, self.seq_len, self.spec.fingerprint())
        if saved != now:
            raise UserError(
                f"the checkpoint's data position belongs to (run.seed, data.seq_len, sources) = {saved}, this run has "
                f"{now}; resuming would change which samples are seen. Restore run.seed, data.seq_len and the "
                "dataset(s) and weights (data.path / data.sources), or start a fresh run (train.resume=none with a "
                "new run.name)"
            )
        self.close()
        self.position = int(state["position"])


def eval_batches(
    spec: StreamSpec, micro_batch_size: int, num_batches: int, dp_rank: int = 0, dp_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first num_batches * dp_size validation micro-batches of `spec` (unshuffled), this
    rank's share: a fixed evaluation set, so evaluation losses compare across steps and runs."""
    sequence = SampleSequence(spec)
    batches = []
    for b in range(num_batches):
        _, tokens = sequence.read((b * dp_size + dp_rank) * micro_batch_size, micro_batch_size)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    return batches
