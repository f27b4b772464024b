"""Preemption: SIGTERM or SIGUSR1 make the run save a checkpoint at the end of a step and exit 0.

Slurm sends SIGTERM when it preempts a job and, with ``--signal=USR1@T``, SIGUSR1 T seconds
before the time limit (scripts/slurm.sbatch); torchrun forwards both to its ranks (run_train.sh).
Every rank must save at the same step, but the signal reaches the ranks at slightly different
times. So at the end of each step a rank puts its flag into an all-reduce (max) on a CPU (gloo)
group without waiting for it, and reads the result of the previous step's all-reduce: all ranks
read the same value at the same step, no rank waits on another, and no device is synchronised.
The save happens at most one step after the signal.
"""

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    def __init__(self, group=None):
        """group: a gloo group of every rank (None: a single process)."""
        self.group = group
        self.signal_name: str | None = None
        """The signal this process received, if any."""
        self.pending: tuple[dist.Work, torch.Tensor] | None = None
        self.previous_handlers: dict = {}

    def install(self):
        for sig in PREEMPTION_SIGNALS:
            self.previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def close(self):
        """Restore the previous handlers; finish the all-reduce in flight (every rank has one)."""
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)
        self.previous_handlers = {}
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None

    def _on_signal(self, signum, frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            logger.warning("%s received: saving a checkpoint at the end of this step, then exiting",
                           self.signal_name)

    def requested(self) -> bool:
        """Called by every rank at the end of every step: whether all ranks stop here."""
        if self.group is None:
            return self.signal_name is not None
        agreed = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            agreed = bool(flag.item())
        flag = torch.tensor([int(self.signal_name is not None)])
        self.pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed
