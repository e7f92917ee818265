"""Resumable, seeded batch streams over a token stream.

The token stream is cut into non-overlapping sequences of seq_len + 1 tokens (inputs and
next-token targets share the boundary token). Each epoch visits them in a permutation seeded by
(seed, epoch). The position is *global*: optimizer step s consumes the next
micro_batch_size * grad_accum_steps * dp_size sequences, and data-parallel rank r takes micro-batch
m from slice (m * dp_size + r). Because the saved state is (epoch, offset) in that global order, a
resumed job sees exactly the samples an uninterrupted job would have seen, also when the number
of data-parallel ranks changes, as long as the global batch size stays the same.
"""

from __future__ import annotations

import torch

from sessa_scale.errors import UserError


class BatchStream:
    """Training batches for one data-parallel rank. tokens: 1-D integer tensor."""

    def __init__(
        self,
        tokens: torch.Tensor,
        seq_len: int,
        micro_batch_size: int,
        grad_accum_steps: int = 1,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
    ):
        self.tokens = tokens
        self.seq_len = seq_len
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.num_sequences = (tokens.numel() - 1) // seq_len
        self.global_batch = micro_batch_size * grad_accum_steps * dp_size
        if self.num_sequences < self.global_batch:
            raise UserError(
                f"the training split holds {self.num_sequences} sequences of data.seq_len={seq_len}, fewer than one "
                f"global batch ({self.global_batch} = train.micro_batch_size x train.grad_accum_steps x data-parallel "
                "ranks); use a larger corpus (data.corpus_bytes) or a smaller batch or seq_len."
            )
        self.epoch, self.offset = 0, 0
        self._perm_epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm, self._perm_epoch = torch.randperm(self.num_sequences, generator=gen), self.epoch
        return self._perm

    def sequence(self, index: int) -> torch.Tensor:
        """Sequence `index` of the stream: (seq_len + 1,) tokens as int64."""
        start = index * self.seq_len
        return self.tokens[start : start + self.seq_len + 1].long()

    def next_indices(self) -> list[torch.Tensor]:
        """Advance one optimizer step; return this rank's sequence ids, one (micro_batch_size,)
        tensor per micro-batch."""
        if self.offset + self.global_batch > self.num_sequences:  # drop the ragged tail of an epoch
            self.epoch, self.offset = self.epoch + 1, 0
        window = self._permutation()[self.offset : self.offset + self.global_batch]
        self.offset += self.global_batch
        mb = self.micro_batch_size
        return [
            window[(m * self.dp_size + self.dp_rank) * mb : (m * self.dp_size + self.dp_rank + 1) * mb]
            for m in range(self.grad_accum_steps)
        ]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches for the next optimizer step: (inputs, targets), each
        (micro_batch_size, seq_len) int64."""
        batches = []
        for ids in self.next_indices():
            seqs = torch.stack([self.sequence(int(i)) for i in ids])
            batches.append((seqs[:, :-1], seqs[:, 1:]))
        return batches

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "offset": self.offset,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict) -> None:
        saved = (state["global_batch"], state["seed"], state["seq_len"])
        if saved != (self.global_batch, self.seed, self.seq_len):
            raise UserError(
                f"the checkpoint's data position was taken with (global batch, run.seed, data.seq_len) = {saved}, this "
                f"run has {(self.global_batch, self.seed, self.seq_len)}; resuming would change which samples are "
                "seen. Keep train.micro_batch_size x train.grad_accum_steps x data-parallel ranks, run.seed and "
                "data.seq_len as they were, or start a fresh run (train.resume=none with a new run.name)."
            )
        self.epoch, self.offset = state["epoch"], state["offset"]


def eval_batches(
    tokens: torch.Tensor, seq_len: int, micro_batch_size: int, num_batches: int, dp_rank: int = 0, dp_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first num_batches * dp_size validation micro-batches in order, this rank's share:
    a fixed evaluation set, so evaluation losses are comparable across steps and runs."""
    n = (tokens.numel() - 1) // seq_len
    batches = []
    for b in range(num_batches):
        start = (b * dp_size + dp_rank) * micro_batch_size
        ids = [i % max(n, 1) for i in range(start, start + micro_batch_size)]
        seqs = torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1].long() for i in ids])
        if seqs.shape[1] != seq_len + 1:
            raise UserError(
                f"the validation split is shorter than one sequence of data.seq_len={seq_len}; raise "
                "data.val_fraction or data.corpus_bytes."
            )
        batches.append((seqs[:, :-1], seqs[:, 1:]))
    return batches
