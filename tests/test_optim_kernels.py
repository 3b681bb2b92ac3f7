"""The native optimizer kernels (native.c) against the optimizers' torch code, bit for bit."""

import pytest
import torch
from test_optim import layer_model

from altgrad.optim import OptimizerSpec, build_optimizer
from altgrad.quantization import native

# ---- native kernels == eager torch code, bit for bit ---------------------------------------------
ARM_SPECS = {
    "adamw-sr": (OptimizerSpec("adamw"), "format", "stochastic"),
    "manifold-sr": (OptimizerSpec("manifold", grid_lr=1.5), "format", "stochastic"),
    "manifold-rtn": (OptimizerSpec("manifold", grid_lr=1.5, max_stiffness=0.05), "format", "nearest"),
    "manifold-master": (OptimizerSpec("manifold", grid_lr=1.5), "master", "nearest"),
    "grid-sr": (OptimizerSpec("grid", grid_lr=3.0, rung_clip=2, eps=0.0), "format", "stochastic"),  # clips, 0/0
    "grid-rtn": (OptimizerSpec("grid", grid_lr=1.5), "format", "nearest"),
}


def _run_arm(arm, fmt, steps=3):
    spec, storage, rounding = ARM_SPECS[arm]
    model = layer_model(fmt, storage=storage, rounding=rounding, seed=4)
    optimizer = build_optimizer(model, spec, seed=7)
    generator = torch.Generator().manual_seed(5)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
        model.fc.weight.grad[1, :3] = 0.0  # zero gradients: 0/0 directions where eps is 0
        optimizer.step()
    state = optimizer.state[model.fc.weight]
    scales = [(float(w.scale), int(w.rescales)) for w in optimizer.weights]
    return model.fc.weight.detach().clone(), {k: v.clone() for k, v in state.items() if torch.is_tensor(v)}, scales


@pytest.mark.parametrize("fmt", ["E5M2", "E3M4", "E0M7", "E7M0"])
@pytest.mark.parametrize("arm", list(ARM_SPECS))
def test_native_optimizer_kernels_equal_the_eager_code_bit_for_bit(monkeypatch, arm, fmt):
    if native.library() is None:
        pytest.skip(f"no native kernel here: {native.unavailable_reason()}")
    monkeypatch.setenv("ALTGRAD_KERNEL", "auto")
    native_weight, native_state, native_scales = _run_arm(arm, fmt)
    monkeypatch.setenv("ALTGRAD_KERNEL", "eager")
    eager_weight, eager_state, eager_scales = _run_arm(arm, fmt)
    assert torch.equal(native_weight.view(torch.int32), eager_weight.view(torch.int32))
    assert native_state.keys() == eager_state.keys()
    for key in native_state:
        assert torch.equal(native_state[key].view(torch.int32) if native_state[key].dtype == torch.float32
                           else native_state[key], eager_state[key].view(torch.int32)
                           if eager_state[key].dtype == torch.float32 else eager_state[key]), key
    assert native_scales == eager_scales
