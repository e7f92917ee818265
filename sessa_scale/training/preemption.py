"""Stopping at a checkpoint: SIGUSR1, SIGTERM or SIGINT (Ctrl-C) asks the trainer to stop after the
current optimizer step; a second SIGINT aborts at once.

SLURM sends SIGUSR1 ahead of the time limit (`#SBATCH --signal=USR1@600` in launch/pretrain.sh) and
SIGTERM on preemption or `scancel`; `docker stop` and torchrun send SIGTERM; a terminal sends SIGINT
on Ctrl-C (torchrun turns its own SIGINT into SIGTERM for the workers). Ranks receive a signal at
different moments (or only some of them do), so the request is all-reduced every step: all ranks
stop after the same step, write one checkpoint together and exit with PREEMPTED_EXIT_CODE.
launch/pretrain.sh then requeues the job, and the next start resumes from that checkpoint
(train.resume=auto). A SIGINT after a stop was requested raises KeyboardInterrupt at once (exit
status 130): the checkpoint being written, if any, is abandoned and `latest` stays on the previous one.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

from sessa_scale.distributed import any_rank

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
PREEMPTED_EXIT_CODE = 75  # sysexits' EX_TEMPFAIL: stopped early at a checkpoint; run again to continue
_FIRST_CTRL_C = (
    "\nsessa-scale: Ctrl-C: finishing the current step, then saving a checkpoint and stopping "
    "(press Ctrl-C again to abort at once without saving)\n"
)


class PreemptionHandler:
    """Installs handlers for PREEMPTION_SIGNALS that only record the signal (restored by `restore`);
    a SIGINT after any recorded signal raises KeyboardInterrupt. Outside the main thread, where
    Python cannot install handlers, signals keep their defaults."""

    def __init__(self, signals: tuple[signal.Signals, ...] = PREEMPTION_SIGNALS):
        self.received: str | None = None  # name of the first signal this rank received
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._record) for sig in signals}

    def _record(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            if self.received is not None:
                raise KeyboardInterrupt
            os.write(2, _FIRST_CTRL_C.encode())  # unbuffered: safe inside a signal handler
        if self.received is None:
            self.received = signal.Signals(signum).name

    def stop_requested(self, device: torch.device) -> bool:
        """Collective (every rank calls it once per step): True on all ranks once any rank got a signal."""
        return any_rank(self.received is not None, device)

    @property
    def reason(self) -> str:
        return f"{self.received} received" if self.received else "a preemption signal reached another rank"

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
