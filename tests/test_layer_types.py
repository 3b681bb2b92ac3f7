"""The layer types of the plan's analysis phase (configs/matrix/layers.yaml, and the shipped small
and paper matrices): which Linear modules each policy quantizes, at every preset, the rest left
in BF16; and what the tied classifier means for the token embedding."""

from pathlib import Path

import pytest
import torch

from altgrad.experiments.matrix import load_matrix
from altgrad.model import GPT, GPTConfig
from altgrad.model.surgery import quantize_model, quantized_layers
from altgrad.optim import build_optimizer
from altgrad.training.config import PRESETS

MATRICES = Path(__file__).parent.parent / "configs" / "matrix"
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
EXPECTED = {
    "attention": lambda n: {f"transformer.h.{i}.attn.{m}" for i in range(n) for m in ("c_attn", "c_proj")},
    "mlp": lambda n: {f"transformer.h.{i}.mlp.{m}" for i in range(n) for m in ("c_fc", "c_proj")},
    "classifier": lambda n: {"lm_head"},
    "uniform": lambda n: {f"transformer.h.{i}.{m}" for i in range(n) for m in LINEARS} | {"lm_head"},
}


def quantized(cell, preset):
    shape = PRESETS[preset]
    model = GPT(GPTConfig(vocab_size=64, block_size=shape["block_size"], n_layer=shape["n_layer"],
                          n_head=shape["n_head"], n_embd=shape["n_embd"]))
    quantize_model(model, cell.config.quant_policy(), 0)
    return model, {name for name, layer in quantized_layers(model).items() if layer.config is not None
                   and layer.config.weight is not None}


@pytest.mark.parametrize("preset", ["tiny", "small", "paper"])
def test_each_layer_type_quantizes_its_modules_alone_at_every_preset(preset):
    matrix = load_matrix(MATRICES / "layers.yaml")
    seen = set()
    for cell in matrix.cells():
        if cell.format == "bf16" or cell.seed != 1337 or cell.arm != "A" or (cell.format, cell.layers) in seen:
            continue
        seen.add((cell.format, cell.layers))
        model, names = quantized(cell, preset)
        assert names == EXPECTED[cell.layers](PRESETS[preset]["n_layer"]), (cell.name, preset)
    assert {layers for _, layers in seen} == set(EXPECTED)


def test_the_shipped_matrices_define_the_same_layer_types():
    layers = load_matrix(MATRICES / "layers.yaml").layers
    for name in ("small", "paper"):
        shipped = load_matrix(MATRICES / f"{name}.yaml").layers
        assert {k: shipped[k] for k in EXPECTED} == {k: layers[k] for k in EXPECTED}, name


def test_the_layer_matrix_runs_e1m6_only_where_every_activation_is_normalised_and_inherits_the_baseline_lr():
    matrix = load_matrix(MATRICES / "layers.yaml")
    assert {c.layers for c in matrix.cells() if c.format == "E1M6"} == {"classifier"}
    assert {t.group: t.inherits for t in matrix.tunings() if t.inherits} == {
        t.group: {"lr": "bf16-BF16"} for t in matrix.tunings() if t.group != "bf16-BF16"}
    assert [t.group for t in matrix.tunings() if t.grids] == ["bf16-BF16"]  # only the baseline is tuned
    assert all(c.config.use_shadow and c.config.shadow_interval == 25 for c in matrix.cells())
    assert matrix.tuning_seed not in matrix.evaluation_seeds


def test_a_stored_classifier_stores_the_tied_embedding_and_a_master_one_does_not():
    """With weights on the grid (arm C) the embedding lookup reads the stored values (the tied
    parameter is the classifier's weight); with FP32 masters (arm A) only lm_head's matmul is cast."""
    matrix = load_matrix(MATRICES / "layers.yaml")
    for arm, on_grid in (("C", True), ("A", False)):
        cell = next(c for c in matrix.cells() if c.format == "E5M2" and c.layers == "classifier" and c.arm == arm)
        model, names = quantized(cell, "tiny")
        build_optimizer(model, cell.config.optimizer_spec(), 0)  # a stored weight is projected here
        embedding = model.transformer.wte.weight
        assert embedding is model.lm_head.weight and names == {"lm_head"}
        grid = torch.tensor(cell.config.quant_policy().rules[0].config.weight.grid(torch.float64).numpy())
        stored = model.lm_head.quantizers["weight"].stored
        scale = float(stored.scale) if stored is not None else 1.0
        assert bool(torch.isin(embedding.detach().double() * scale, grid).all()) == on_grid, arm
