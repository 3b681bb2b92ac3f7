"""`compile: true` with quantized layers: the model between them is compiled, the quantized GEMMs
run the eager native casts (a graph break), so the simulated quantization is exactly eager's."""

import pytest

from altgrad.quantization import native
from altgrad.training import Trainer
from altgrad.training.tracking import read_metrics
from runs import tiny_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arm", [{"optimizer": "adamw"}, {"optimizer": "grid"}], ids=["A-master", "E-grid"])
def test_a_compiled_fp8_run_casts_eagerly_and_trains_like_the_eager_run(tmp_path, tiny_data, monkeypatch, arm):
    settings = dict(format="E5M2", rounding="stochastic", max_steps=8, eval_interval=4, **arm)
    eager = Trainer(tiny_config(tmp_path, tiny_data, run_name="eager", **settings)).run()
    calls = []
    original = native.cast
    monkeypatch.setattr(native, "cast", lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs))
    compiled = Trainer(tiny_config(tmp_path, tiny_data, run_name="compiled", compile=True, **settings)).run()
    assert compiled.status == "completed"
    layers = len(compiled.layers)
    # every training step: activation, weight and gradient casts of every quantized layer ran the
    # native kernel, i.e. outside the compiled graph (a traced cast would run the torch kernel);
    # plus the evaluations' forward casts (activation and weight)
    evaluations = 3 * 4  # steps 0, 4, 8, eval_iters 4 each
    weight_casts = 0 if arm["optimizer"] == "grid" else 1  # a stored weight is not cast again
    assert len(calls) == 8 * layers * (2 + weight_casts) + evaluations * layers * (1 + weight_casts)
    for a, b in zip(read_metrics(eager.run_dir), read_metrics(compiled.run_dir), strict=True):
        for key in ("loss", "val_loss", "grad/norm"):
            if key in a:  # the compiled LayerNorm, GELU and softmax round like any inductor graph
                assert b[key] == pytest.approx(a[key], rel=1e-3), (a["step"], key)
