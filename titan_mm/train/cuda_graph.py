"""The whole training step as one CUDA graph (``compile.cuda_graph``).

Every batch has the same shapes (B x S tokens, N x L image slots), so the step's device work
(forward, backward, gradient clipping, optimizer) launches the same kernels on the same buffers
every time. ``StepGraph`` runs the first steps normally, captures the next one and then only
replays it: one launch per step instead of thousands, no Python, no compile guards. On one H100
this took the Qwen3-VL-2B benchmark from 0.252 to 0.242 s per step (docs/benchmarks.md).

What the captured step may do: read its inputs from the tensors ``StepGraph`` copies each batch
into, and never synchronise with the host. The LR reaches the optimizer through a device tensor
(``build_optimizer(..., capturable=True)``), so the schedule can change it between replays.
"""

import torch
from torch.utils._pytree import tree_flatten, tree_map


class StepGraph:
    """``step(inputs)`` run normally for ``warmup`` calls (compiling, allocating optimizer state),
    then captured once and replayed; ``inputs`` is a pytree of tensors of fixed shapes.

    Returns ``step``'s outputs: after capture, the same tensors every call, overwritten by each
    replay (clone what must outlive the next step).
    """

    def __init__(self, step, warmup: int = 2):
        self.step, self.warmup, self.calls = step, warmup, 0
        self.graph = self.static_inputs = self.outputs = None
        self.side_stream = torch.cuda.Stream()

    def __call__(self, inputs):
        self.calls += 1
        if self.calls <= self.warmup:
            # off the default stream, as CUDA graph capture wants its warm-up
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                outputs = self.step(inputs)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return outputs
        if self.graph is None:
            self.static_inputs = tree_map(lambda t: t.to("cuda", copy=True), inputs)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = self.step(self.static_inputs)
        else:
            self.copy_inputs(inputs)
        self.graph.replay()
        return self.outputs

    def copy_inputs(self, inputs):
        new, _ = tree_flatten(inputs)
        static, _ = tree_flatten(self.static_inputs)
        for dst, src in zip(static, new, strict=True):
            if dst.shape != src.shape:
                raise ValueError(f"a CUDA graph replays fixed shapes: an input of shape {tuple(dst.shape)} "
                                 f"came as {tuple(src.shape)}")
            dst.copy_(src, non_blocking=True)
