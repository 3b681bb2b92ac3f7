"""LayerNorm whose gradients do not depend on the number of CPU threads.

PyTorch's CPU LayerNorm backward sums the weight and bias gradients over the rows in one partial
sum per thread and then adds the partials: another thread count, another order of additions,
other last bits (measured: 1 vs 2 threads, every LayerNorm's weight and bias gradient of the tiny
and small presets, in BF16 autocast and in FP32; nothing else in the model differed). A run on a
shared machine, whose thread governor follows the CPUs it gets, then drifted from the same run
on a quiet one, and a resumed run from the uninterrupted one.

Here the forward is PyTorch's own (`aten.native_layer_norm`: the same output bits) and so is the
backward (`aten.native_layer_norm_backward`), run on one thread: its partial sums are then one,
in row order, the bits PyTorch gives at one thread whatever the count the run has. A LayerNorm
backward is a small part of a step (`benchmarks/bench_layernorm.py` measures the whole step);
`tests/test_threads.py` checks the gradients bit for bit across thread counts.
"""

from __future__ import annotations

import torch
from torch import nn


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            grad_x, grad_w, grad_b = torch.ops.aten.native_layer_norm_backward(
                grad, x, ctx.shape, mean, rstd, weight, bias, mask)
        finally:
            torch.set_num_threads(threads)
        return grad_x, grad_w, grad_b, None, None


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters, state dict, forward and gradients at one thread) with
    gradients that no CPU thread count changes; elsewhere (CUDA) PyTorch's own kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        if torch.is_autocast_enabled("cpu"):  # as autocast runs layer_norm: in FP32 (the decorators cost more)
            x = x.float()
        return _LayerNormFunction.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)
