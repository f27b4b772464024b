"""Batches on the device one step ahead of the step that trains on them.

On a GPU, ``DevicePrefetcher.prefetch()`` runs right after a step's device work is launched: it
reads the next step's microbatches from the loader (pinned host memory), prepares them on the host
(``prepare``: sequence sharding, batch facts) and starts their copies to the GPU on a side stream,
so the read and the copy overlap the step still computing. The next ``next_step()`` makes the
compute stream wait for those copies (a device-side wait, no host sync) and tells the allocator
the compute stream now uses the tensors (``record_stream``).

Reading ahead moves the loader one step past the trained steps, so a checkpoint taken in between
must not save the loader as it is: ``checkpoint_states()`` gives states that report the loader as
of the last step handed out. Elsewhere (CPU) nothing is read ahead: ``next_step()`` reads its own
batches.
"""

import time
from typing import Callable, Iterable

import torch
from torch.distributed.checkpoint.stateful import Stateful


class DevicePrefetcher:
    """``next_step()`` -> (the ``microbatches`` batches of one step, their tensors on ``device``;
    the seconds this process waited on the loader since the previous call)."""

    def __init__(self, loader: Iterable[dict], device: torch.device, microbatches: int,
                 prepare: Callable[[dict], dict], states: dict[str, Stateful], read_ahead: bool):
        self.loader, self.device, self.microbatches, self.prepare = loader, device, microbatches, prepare
        self.states = states
        """The loader's live checkpoint states, by checkpoint key."""
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.read_ahead = read_ahead
        self.iterator = None
        self.ready: list[dict] | None = None
        """The next step's batches, read ahead (and being copied)."""
        self.states_before_ready: dict[str, dict] | None = None
        self.wait_s = 0.0

    def next_step(self) -> tuple[list[dict], float]:
        if self.ready is None:
            self._read()
        batches, self.ready, self.states_before_ready = self.ready, None, None
        if self.stream is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(self.stream)
            for mb in batches:
                for t in mb.values():
                    if isinstance(t, torch.Tensor):
                        t.record_stream(compute)  # allocated on the copy stream
        wait_s, self.wait_s = self.wait_s, 0.0
        return batches, wait_s

    def prefetch(self):
        """Read the next step's batches now and start their copies (when reading ahead)."""
        if not self.read_ahead or self.ready is not None:
            return
        self.states_before_ready = {k: s.state_dict() for k, s in self.states.items()}
        self._read()

    def _read(self):
        if self.iterator is None:
            self.iterator = iter(self.loader)
        start = time.perf_counter()
        host = [next(self.iterator) for _ in range(self.microbatches)]
        self.wait_s += time.perf_counter() - start
        host = [self.prepare(mb) for mb in host]
        if self.stream is None:
            self.ready = host
            return
        with torch.cuda.stream(self.stream):
            self.ready = [{k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                           for k, v in mb.items()} for mb in host]

    def checkpoint_states(self) -> dict[str, Stateful]:
        """The loader's states for checkpoints: as of the batches handed out by next_step()."""
        return {key: _ConsumedState(self, key) for key in self.states}


class _ConsumedState(Stateful):
    def __init__(self, prefetcher: DevicePrefetcher, key: str):
        self.prefetcher, self.key = prefetcher, key

    def state_dict(self) -> dict:
        p = self.prefetcher
        if p.states_before_ready is not None:
            return p.states_before_ready[self.key]
        return p.states[self.key].state_dict()

    def load_state_dict(self, state: dict):
        if self.prefetcher.iterator is not None:
            raise RuntimeError("a loader state is loaded before the first batch is read")
        self.prefetcher.states[self.key].load_state_dict(state)
