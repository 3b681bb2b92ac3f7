"""LayerNorm whose gradients do not depend on the number of CPU threads.

PyTorch's CPU LayerNorm backward sums the weight and bias gradients over the rows in one partial
sum per thread and then adds the partials: another thread count, another order of additions,
other last bits (measured: 1 vs 2 threads, every LayerNorm's weight and bias gradient of the tiny
and small presets, in BF16 autocast and in FP32; nothing else in the model differed). A run on a
shared machine, whose thread governor follows the CPUs it gets, then drifts from the same run on
a quiet one, and a resumed run from the uninterrupted one.

Here the forward is PyTorch's own (`aten.native_layer_norm`: the same output bits), the input
gradient is PyTorch's own (computed per row by one thread: no cross-thread sum), and the weight
and bias gradients are column sums over a transposed, contiguous copy, so that every column is
one contiguous inner reduction that one thread does whole; the threads split the columns, never
a column. `tests/test_threads.py` checks the gradients bit for bit across thread counts.
"""

from __future__ import annotations

import torch
from torch import nn


def _column_sums(rows: torch.Tensor) -> torch.Tensor:
    """Sums over the rows of a (rows, columns) tensor, each column added up by a single thread."""
    return rows.t().contiguous().sum(dim=1)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x, weight, bias, shape, eps):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = None
        if need_x:
            grad_x, _, _ = torch.ops.aten.native_layer_norm_backward(
                grad, x, ctx.shape, mean, rstd, weight, bias, [True, False, False])
        columns = weight.numel() if weight is not None else x.shape[-1]
        grad_w = _column_sums((grad * ((x - mean) * rstd)).reshape(-1, columns)).view_as(weight) if need_w else None
        grad_b = _column_sums(grad.reshape(-1, columns)).view_as(bias) if need_b else None
        return grad_x, grad_w, grad_b, None, None


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters, state dict and forward) with thread-invariant gradients on
    CPU; elsewhere (CUDA) PyTorch's own kernel, whose reductions do not follow a thread count."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return _LayerNormFunction.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)
