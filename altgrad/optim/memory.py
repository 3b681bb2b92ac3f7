"""Memory per parameter: the bits of persistent training state that the weights with a format
(the quantized layers' weights, which the arms store differently) carry, per weight element.

Counted from the live model and optimizer, not from a table, so it is what the run keeps:

- ``stored``: a weight kept on its format's grid, at the format's width (8 for the FP8
  formats). The simulation holds those values in float32 tensors; a real kernel keeps the codes,
  and the point of storing on the grid is that width;
- ``master``: a weight kept as a master copy, at its tensor's width (32 for FP32 masters);
- ``moments``: the optimizer's state tensors of the weight's shape (Adam's two moments in
  float32: 64; GridOptim's momentum direction keeps one: 32);
- ``compensation``: a compensated weight's buffer (bfloat16: 16);
- ``other``: the rest of the state, amortised over the weight's elements: the per-tensor
  storage scale (32 bits a tensor) and the optimizer's step counters (torch's float32 ``step``).

So arm A counts 32 + 64, B, C and ECO 8 + 64 (ECO's feedback lives in the moment it already
has), C-kahan 8 + 16 + 64, each plus a few millionths of a bit for the scalars. Activations,
gradients and the parameters without a format (embeddings, norms, biases) are the same in every
arm and not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..model.surgery import quantized_layers

#: The parts of `StateBits`, in the order reports show them.
PARTS = ("stored", "master", "moments", "compensation", "other")


@dataclass(frozen=True)
class StateBits:
    """Bits per weight element of each part (module doc), over ``params`` elements."""

    params: int
    stored: float
    master: float
    moments: float
    compensation: float
    other: float

    @property
    def total(self) -> float:
        return sum(getattr(self, part) for part in PARTS)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _bits(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size() * 8


def state_bits(model: nn.Module, optimizer: torch.optim.Optimizer) -> StateBits | None:
    """The persistent training state of the model's weights with a format, per element (None
    when no layer has a weight format). Call after the first step: torch's optimizers create
    their moments then."""
    compensated = {id(w.param): w.compensation for w in getattr(optimizer, "weights", ())}
    totals = dict.fromkeys(PARTS, 0)
    params, seen = 0, set()
    for layer in quantized_layers(model).values():
        fmt, weight = layer.config.weight, layer.weight
        if fmt is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        n = weight.numel()
        params += n
        if layer.config.weight_storage == "format":
            totals["stored"] += fmt.bits * n
            totals["other"] += 32  # its storage scale
        else:
            totals["master"] += _bits(weight)
        for value in optimizer.state.get(weight, {}).values():
            if isinstance(value, torch.Tensor):
                totals["moments" if value.numel() == n and n > 1 else "other"] += _bits(value)
        buffer = compensated.get(id(weight))
        if buffer is not None:
            totals["compensation"] += _bits(buffer)
    if not params:
        return None
    return StateBits(params=params, **{part: bits / params for part, bits in totals.items()})
