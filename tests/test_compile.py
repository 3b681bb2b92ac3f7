"""`compile: true`. Mode exact (the default) captures the model's graph but runs every op on its
ATen kernel: a compiled run is bit-identical to the eager one, every arm, every metric, every
weight. Mode fused lets inductor fuse and reduce in its own order: equal to float precision. In
both, the quantized GEMMs run the eager native casts (a graph break), so the simulated
quantization is exactly eager's."""

import pytest
import torch

from altgrad.model.surgery import quantized_layers
from altgrad.quantization import native
from altgrad.training import Trainer
from altgrad.training.checkpoint import list_checkpoints, load_checkpoint
from altgrad.training.tracking import read_metrics
from runs import tiny_config, without_rates

pytestmark = pytest.mark.slow

ARMS = {
    "bf16": dict(),
    "fp32-E4M3": dict(format="E4M3", precision="fp32"),
    "A": dict(format="E5M2", rounding="stochastic", optimizer="adamw"),
    "B": dict(format="E4M3", optimizer="adamw", weight_storage="format", update_rounding="nearest"),
    "C": dict(format="E3M4", optimizer="adamw", weight_storage="format", update_rounding="stochastic"),
    "D": dict(format="E5M2", optimizer="manifold"),
    "E": dict(format="E4M3", optimizer="grid"),
}


def _run(tmp_path, data, name, **settings):
    return Trainer(tiny_config(tmp_path, data, run_name=name, max_steps=6, eval_interval=3, stats_interval=2,
                               rank_interval=3, checkpoint_interval=6, **settings)).run()


def _final_model(result):
    return load_checkpoint(list_checkpoints(result.run_dir)[-1])["model"]


@pytest.mark.parametrize("arm", list(ARMS))
def test_an_exact_compiled_run_is_bit_identical_to_the_eager_run(tmp_path, tiny_data, arm):
    torch._dynamo.reset()
    eager = _run(tmp_path, tiny_data, "eager", **ARMS[arm])
    compiled = _run(tmp_path, tiny_data, "compiled", compile=True, **ARMS[arm])
    assert compiled.status == eager.status == "completed"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    a, b = without_rates(read_metrics(eager.run_dir)), without_rates(read_metrics(compiled.run_dir))
    assert len(a) == len(b)
    for x, y in zip(a, b):  # every metric, bit for bit (NaN where eager has NaN)
        assert x.keys() == y.keys()
        for key in x:
            assert x[key] == y[key] or (x[key] != x[key] and y[key] != y[key]), (x["step"], key, x[key], y[key])
    final_eager, final_compiled = _final_model(eager), _final_model(compiled)
    for name, tensor in final_eager.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, final_compiled[name]), name


@pytest.mark.parametrize("arm", ["A", "E"])
def test_a_fused_compiled_fp8_run_casts_eagerly_and_trains_like_the_eager_run(tmp_path, tiny_data, monkeypatch, arm):
    settings = dict(format="E5M2", rounding="stochastic", max_steps=8, eval_interval=4, stats_interval=10,
                    adapt_threads=False,  # no thread check: its step would cast too
                    optimizer=ARMS[arm]["optimizer"])
    eager = Trainer(tiny_config(tmp_path, tiny_data, run_name="eager", **settings)).run()
    calls = []
    original = native.cast
    monkeypatch.setattr(native, "cast", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    trainer = Trainer(tiny_config(tmp_path, tiny_data, run_name="compiled", compile=True, compile_mode="fused",
                                  **settings))
    compiled = trainer.run()
    assert compiled.status == "completed"
    layers = len(compiled.layers)
    # every training step: the (stochastic) activation and weight casts of every quantized layer
    # ran the native kernel, i.e. outside the compiled graph (a traced cast would run the torch
    # kernel); plus the evaluations' forward casts. The gradient casts (nearest) are the C++ node's
    # own, from its native stream: outside the graph too, and they leave the stream's scale.
    evaluations = 3 * 4  # steps 0, 4, 8, eval_iters 4 each
    weight_casts = 0 if arm == "E" else 1  # a stored weight is not cast again
    assert len(calls) == (8 + evaluations) * layers * (1 + weight_casts)
    assert all(layer.quantizers["gradient"].last_scale is not None for layer in quantized_layers(trainer.model).values())
    for a, b in zip(read_metrics(eager.run_dir), read_metrics(compiled.run_dir), strict=True):
        for key in ("loss", "val_loss", "grad/norm"):
            if key in a:  # the fused LayerNorm, GELU and softmax round like any inductor graph
                assert b[key] == pytest.approx(a[key], rel=1e-3), (a["step"], key)
