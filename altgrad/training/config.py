"""Training configuration: one dataclass, presets, YAML files and command-line overrides.

Precedence: dataclass defaults < preset < YAML file < command-line flags. Unknown keys are
errors that list the valid ones; the resolved config is saved with every run.

Each field is declared once, with `option`: its help, section, unit, whether it changes a run's
result and whether ``--resume`` may change it. The ``altgrad train`` options, `compare`'s pairing,
the resume check, TEST_MATRIX.md and the config reference page (`config_doc`) derive from that.
A YAML file gives flat keys (``lr: 0.002``) or sections (``schedule: {lr: 0.002}``), or both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..model.surgery import QuantPolicy, build_policy
from ..optim import COMPENSATION_DTYPES, COMPENSATIONS, GRID_DIRECTIONS, GRID_LR_UNITS, OPTIMIZERS, OptimizerSpec
from ..quantization.linear import WEIGHT_STORAGES
from ..quantization.quantize import ROUNDINGS
from .clipping import CLIP_MODES

PRECISIONS = ("fp32", "bf16")
WANDB_MODES = ("disabled", "offline", "online")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("exact", "fused")
#: What an optimizer implies when weight_storage / update_rounding are not given (DESIGN §4 arms):
#: adamw -> FP32 masters (arm A; with format storage, nearest: arm B); manifold -> D; grid -> E;
#: eco -> stored, round-to-nearest (its error feedback is the remedy for stalling, Nikdan et al.).
#: The geometry arms on FP32 masters (manifold-master, grid-master: the same update rule, the
#: grid only sizes the step) take ``weight_storage: master`` explicitly.
ARM_DEFAULTS = {"adamw": ("master", "nearest"), "manifold": ("format", "stochastic"),
                "grid": ("format", "stochastic"), "eco": ("format", "nearest")}


#: The sections of a config, in the order the reference page and ``--help`` show them.
SECTIONS = {
    "model": "the GPT's shape (and the preset the other settings start from)",
    "data": "what the model reads, and how much of it per step",
    "schedule": "how long it trains and the learning-rate schedule",
    "precision": "the simulated low-precision policy: formats, rounding, scaling, format shifts",
    "optimizer": "the update rule, where weights live, and gradient clipping",
    "monitoring": "measurements, alerts, evaluation and tracking",
    "checkpoints": "how often the run is saved, and how many saves are kept",
    "runtime": "names, places, seed, device and compilation",
}
#: The comparison axes: settings that change the result but are what a comparison varies
#: (paired runs may differ in them): the precision policy and the optimizer arm.
AXES = ("precision", "arm")
_META = "altgrad"


def option(default: Any, help: str, *, section: str, result: bool, unit: str = "", resumable: bool = False,
           axis: str | None = None, cli: bool | tuple[str, ...] = False, per_layer: bool = False) -> Any:
    """A `TrainConfig` field and everything the code derives from it, declared once.

    ``help``: one line for ``--help`` and the reference page; ``section``: one of `SECTIONS`;
    ``unit``: what a number counts ("" when it is a name, a switch or absolute); ``result``: whether
    it can change a run's result (weights, losses; False: a name, place or measurement only, and
    paired runs may differ in it); ``axis``: "precision" or "arm" for a setting a comparison
    varies (paired runs may differ in it too); ``resumable``: whether ``--resume`` may change it;
    ``cli``: an ``altgrad train`` option (True: ``--the-name``, or its declarations); ``per_layer``:
    a policy rule may set it per layer (the config's value is every rule's default).
    """
    if section not in SECTIONS:
        raise ValueError(f"section must be one of {', '.join(SECTIONS)}, got {section!r}")
    if axis is not None and (axis not in AXES or not result):
        raise ValueError(f"axis must be one of {', '.join(AXES)}, and only on a setting with result=True")
    meta = dict(help=help, section=section, unit=unit, result=result, resumable=resumable, axis=axis,
                cli=tuple(cli) if isinstance(cli, (tuple, list)) else bool(cli), per_layer=per_layer)
    return field(default=default, metadata={_META: meta})


@dataclass(frozen=True)
class TrainConfig:
    """One run's settings. Each field is declared with `option` (help, section, unit, whether it
    changes the result, whether ``--resume`` may change it); `settings` lists them for the CLI,
    `compare`'s pairing, the resume check and the generated documents. Field order is the order of
    a saved config and of `compare`'s first difference."""
    run_name: str | None = option(None, "the run's folder under runs_dir; default <preset>-<label>[-<arm>]-seed<seed>",
                                  section="runtime", result=False, resumable=True, cli=True)
    runs_dir: str = option("runs", "where runs are written", section="runtime", unit="path", result=False,
                           resumable=True, cli=True)
    preset: str = option("small", "tiny | small | paper: the shape, batch, steps and evaluation the other settings "
                         "start from (a preset's values are themselves fields)", section="model", result=False,
                         cli=True)
    seed: int = option(1337, "seed for initial weights and batches", section="runtime", result=True, cli=True)
    device: str = option("auto", "auto | cpu | cuda", section="runtime", result=False, cli=True)
    compile: bool = option(False, "torch.compile the model", section="runtime", result=False,
                           cli=("--compile/--no-compile",))
    compile_mode: str = option("exact", "exact: bit-identical to eager (ATen kernels, default) | fused: inductor's "
                               "fused kernels, equal to float precision", section="runtime", result=True, cli=True)
    adapt_threads: bool = option(True, "on CPU, use fewer threads while another process takes cores (default), or "
                                 "keep the count (training/threads.py)", section="runtime", result=False,
                                 resumable=True, cli=("--adapt-threads/--fixed-threads",))
    data: str | None = option(None, "prepared data directory; default data/eurlex, else the built-in corpus",
                              section="data", unit="path", result=True, cli=True)
    n_layer: int = option(4, "transformer blocks", section="model", unit="blocks", result=True)
    n_head: int = option(4, "attention heads per block", section="model", unit="heads", result=True)
    n_embd: int = option(128, "embedding width (a multiple of n_head)", section="model", unit="features",
                         result=True)
    block_size: int = option(64, "context length", section="model", unit="tokens", result=True)
    dropout: float = option(0.0, "dropout probability", section="model", unit="probability", result=True)
    bias: bool = option(True, "biases in the Linear and LayerNorm layers", section="model", result=True)
    precision: str = option("bf16", "fp32 | bf16 (layers outside the FP8 policy)", section="precision",
                            result=True, axis="precision", cli=True)
    batch_size: int = option(12, "sequences per micro-batch", section="data", unit="sequences", result=True, cli=True)
    grad_accum: int = option(1, "micro-batches per optimizer step", section="data", unit="micro-batches",
                             result=True, cli=True)
    max_steps: int = option(2000, "optimizer steps", section="schedule", unit="steps", result=True, resumable=True,
                            cli=True)
    # The schedule (training/setup.py `learning_rate`): linear warmup to lr, cosine decay to the
    # floor `floor_lr` at decay_steps, then flat. Its shape is set as fractions, so that arms
    # with different peaks decay alike (DESIGN §5.1).
    lr: float = option(1e-3, "peak learning rate, absolute: AdamW, and every parameter without a format",
                       section="schedule", result=True, cli=True)
    min_lr: float | None = option(None, "the schedule's floor, absolute (older configs); not together with "
                                  "min_lr_ratio", section="schedule", result=True)
    min_lr_ratio: float | None = option(None, "the schedule's final lr as a fraction of --lr, 0..1 (default 0.1 "
                                        "when min_lr is not given)", section="schedule", unit="fraction of lr",
                                        result=True, cli=True)
    warmup_steps: int = option(100, "linear warmup to lr; ignored when warmup_ratio is given", section="schedule",
                               unit="steps", result=True)
    warmup_ratio: float | None = option(None, "warmup as a fraction of --max-steps (round(ratio * max_steps) steps, "
                                        "0 <= r < 1), instead of warmup_steps", section="schedule",
                                        unit="fraction of max_steps", result=True, cli=True)
    lr_decay_steps: int | None = option(None, "where the cosine decay reaches its floor; default max_steps",
                                        section="schedule", unit="steps", result=True)
    weight_decay: float = option(0.1, "decoupled weight decay on tensors of two or more dimensions",
                                 section="optimizer", result=True)
    beta1: float = option(0.9, "Adam's first-moment decay rate", section="optimizer", result=True)
    beta2: float = option(0.99, "Adam's second-moment decay rate", section="optimizer", result=True)
    grad_clip: float = option(1.0, "clip bound: the global L2 norm, or per partition in units of the format's range",
                              section="optimizer", unit="L2 norm", result=True)
    grad_clip_mode: str = option("global", "global (one norm) | partition (per gradient format, bounded by its "
                                 "range; training/clipping.py)", section="optimizer", result=True, axis="precision",
                                 cli=True)
    nan_patience: int = option(5, "consecutive non-finite steps before a run is declared diverged",
                               section="monitoring", unit="steps", result=True)
    # the optimizer and where weights live (DESIGN §4)
    optimizer: str = option("adamw", "adamw | manifold (steps in ULPs) | grid (moves in codes) | eco (AdamW, "
                            "stored, rounding error fed back into the momentum: optim/eco.py)", section="optimizer",
                            result=True, axis="arm", cli=("--optimizer", "-o"))
    weight_storage: str | None = option(None, "master (FP32 weights) | format (weights live on the grid); default: "
                                        "master for adamw, format for manifold, grid and eco", section="optimizer",
                                        result=True, axis="arm", cli=True, per_layer=True)
    update_rounding: str | None = option(None, "nearest | stochastic: how w + delta lands on the grid (format "
                                         "storage); default: nearest for adamw and eco, stochastic for manifold and "
                                         "grid", section="optimizer", result=True, axis="arm", cli=True,
                                         per_layer=True)
    compensation: str = option("none", "none | kahan: a buffer per stored weight keeps what the grid could not hold "
                               "and adds it to the next step's w + delta before rounding (adamw, manifold, grid; "
                               "optim/storage.py)", section="optimizer", result=True, axis="arm", cli=True)
    compensation_dtype: str = option("bfloat16", "the compensation buffer's dtype: bfloat16 | float16 | float32",
                                     section="optimizer", result=True, axis="arm")
    grid_lr: float = option(0.5, "manifold: ULPs per step; grid: rungs per step (format weights; the same schedule "
                            "as lr)", section="optimizer", unit="ULPs or rungs per step (grid_lr_unit)", result=True,
                            axis="arm", cli=True)
    grid_lr_unit: str = option("ulp", "ulp: grid_lr counts ULPs or rungs (default) | binade: grid_lr * 2^M of them "
                               "(M mantissa bits of the weight's format at step time: the same step in every "
                               "format, one sweep range for all)", section="optimizer", result=True, axis="arm",
                               cli=True)
    max_stiffness: float | None = option(None, "manifold: cap on the stiffness S(w), absolute (none: uncapped)",
                                         section="optimizer", result=True, axis="arm")
    rung_clip: int = option(4, "grid: most rungs a weight moves in one step", section="optimizer", unit="rungs",
                            result=True, axis="arm")
    grid_direction: str = option("adam", "grid: adam (Adam-normalised) | momentum", section="optimizer",
                                 result=True, axis="arm")
    # simulated low precision (DESIGN §2): `format` puts every Linear in one format; `policy`
    # (a list of rules {layers: pattern, format | weight/activation/gradient, ...}) mixes them.
    format: str | None = option(None, "simulate this format in every Linear (weights, activations), e.g. E5M2; not "
                                "together with policy", section="precision", result=True, axis="precision",
                                cli=("--format", "-f"))
    grad_format: str = option("E5M2", "gradient format", section="precision", result=True, axis="precision",
                              cli=True)
    rounding: str = option("nearest", "nearest | stochastic (weights and activations)", section="precision",
                           result=True, axis="precision", cli=True, per_layer=True)
    grad_rounding: str = option("nearest", "nearest | stochastic (gradients)", section="precision", result=True,
                                axis="precision", cli=True, per_layer=True)
    sr_bits: int | None = option(None, "stochastic rounding with N random bits (1-30, as hardware draws; biased "
                                 "toward zero by under 2^-N of a grid step; quantization/kernel.py) for every operand "
                                 "and update; default (none) exact", section="precision", unit="bits", result=True,
                                 axis="precision", cli=True, per_layer=True)
    scaling: str = option("current", "current | delayed | none (per-tensor amax scaling)", section="precision",
                          result=True, axis="precision", cli=True, per_layer=True)
    amax_history_len: int = option(16, "delayed scaling: the amax history's length", section="precision",
                                   unit="steps", result=True, axis="precision", per_layer=True)
    scale_margin: int = option(0, "headroom of the scale: max / amax * 2^-margin", section="precision",
                               unit="binades", result=True, axis="precision", per_layer=True)
    power_of_two_scales: bool = option(True, "scales rounded down to powers of two (exact unscaling)",
                                       section="precision", result=True, axis="precision", per_layer=True)
    gemm_dtype: str = option("bf16", "the dtype the dequantized operands multiply in: bf16 | fp32",
                             section="precision", result=True, axis="precision", per_layer=True)
    policy: tuple[dict, ...] = option((), "rules {layers: pattern, format | weight/activation/gradient, ...}, the "
                                      "first match per Linear; not together with format", section="precision",
                                      result=True, axis="precision")
    # emergency mantissa shift (training/shift.py)
    format_shift: bool = option(False, "move a layer that overflows (stalls) in shift_patience measurements in a row "
                                "to one more exponent (mantissa) bit", section="precision", result=True,
                                axis="precision", cli=("--format-shift/--no-format-shift",))
    shift_patience: int = option(3, "measurements in a row that trigger a format shift", section="precision",
                                 unit="measurements", result=True, axis="precision")
    # monitoring: quantization statistics, bit-stall, dead units, the FP32 gradient shadow
    stats_interval: int = option(10, "steps between quantization and update statistics", section="monitoring",
                                 unit="steps", result=False, cli=True)
    dead_window: int = option(100, "steps over which an input unit must stay zero to count as dead",
                              section="monitoring", unit="steps", result=False)
    use_shadow: bool = option(False, "compare gradients with an FP32 shadow every shadow_interval steps",
                              section="monitoring", result=False, cli=("--shadow/--no-shadow",))
    shadow_interval: int = option(10, "steps between FP32 gradient shadow comparisons (with use_shadow)",
                                  section="monitoring", unit="steps", result=False, cli=True)
    overflow_threshold: float = option(0.001, "alert when quant/overflow_rate exceeds it", section="monitoring",
                                       unit="fraction", result=False)
    underflow_threshold: float = option(0.5, "alert when quant/underflow_rate exceeds it", section="monitoring",
                                        unit="fraction", result=False)
    bit_stall_threshold: float = option(0.99, "alert when quant/bit_stall_rate exceeds it", section="monitoring",
                                        unit="fraction", result=False)
    grad_cos_threshold: float = option(0.9, "alert when grad_cos_sim/mean falls below it", section="monitoring",
                                       unit="cosine", result=False)
    rank_interval: int = option(100, "steps between rank measurements", section="monitoring", unit="steps",
                                result=False)
    rank_threshold: float = option(0.3, "warn when a layer's effective rank falls more than this below its highest "
                                   "value of the last rank_window of training", section="monitoring",
                                   unit="fraction", result=False)
    rank_window: float = option(0.25, "the trailing window a rank drop is measured over, as a fraction of max_steps; "
                                "drops are judged from the end of the first window (and of warmup) on, after the "
                                "early phase in which every healthy run leaves its random initialisation's rank",
                                section="monitoring", unit="fraction of max_steps", result=False)
    critical_layers: tuple[str, ...] = option(("lm_head", "*.attn.c_proj"), "layers (fnmatch patterns) that warn at "
                                              "rank_threshold times critical_threshold_multiplier",
                                              section="monitoring", result=False)
    critical_threshold_multiplier: float = option(0.5, "factor on rank_threshold for critical_layers",
                                                  section="monitoring", result=False)
    # evaluation, checkpoints, tracking
    eval_interval: int = option(250, "steps between evaluations", section="monitoring", unit="steps", result=False,
                                cli=True)
    eval_iters: int = option(20, "validation batches per evaluation (the validation set)", section="monitoring",
                             unit="batches", result=True)
    log_interval: int = option(10, "steps between training records", section="monitoring", unit="steps",
                               result=False)
    checkpoint_interval: int = option(250, "steps between checkpoints", section="checkpoints", unit="steps",
                                      result=False, cli=True)
    keep_checkpoints: int = option(2, "checkpoints kept (the newest)", section="checkpoints", unit="checkpoints",
                                   result=False)
    wandb: str = option("disabled", "online | offline | disabled (Weights & Biases)", section="monitoring",
                        result=False, resumable=True, cli=True)
    wandb_project: str = option("altgrad", "the W&B project", section="monitoring", result=False)
    tags: tuple[str, ...] = option((), "labels recorded with the run (W&B tags)", section="monitoring", result=False)

    def __post_init__(self) -> None:
        checks = [
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.wandb in WANDB_MODES, f"wandb must be one of {', '.join(WANDB_MODES)}"),
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}"),
            (self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}"),
            (self.compile_mode in COMPILE_MODES, f"compile_mode must be one of {', '.join(COMPILE_MODES)}"),
            (self.n_embd % self.n_head == 0, "n_embd must be divisible by n_head"),
            (self.max_steps >= 1 and self.batch_size >= 1 and self.grad_accum >= 1,
             "max_steps, batch_size and grad_accum must be >= 1"),
            (self.eval_interval >= 1 and self.log_interval >= 1 and self.checkpoint_interval >= 1,
             "eval_interval, log_interval and checkpoint_interval must be >= 1"),
            (self.keep_checkpoints >= 1 and self.nan_patience >= 1, "keep_checkpoints and nan_patience must be >= 1"),
            (self.lr > 0, "need lr > 0"),
            (self.min_lr is None or self.min_lr_ratio is None,
             "give the floor of the schedule as min_lr (absolute) or min_lr_ratio (a fraction of lr), not both"),
            (self.min_lr is None or 0 <= self.min_lr <= self.lr, "need 0 <= min_lr <= lr"),
            (self.min_lr_ratio is None or 0 <= self.min_lr_ratio <= 1, "need 0 <= min_lr_ratio <= 1"),
            (self.warmup_steps >= 0, "need warmup_steps >= 0"),
            (self.warmup_ratio is None or 0 <= self.warmup_ratio < 1, "need 0 <= warmup_ratio < 1"),
            (self.stats_interval >= 1 and self.shadow_interval >= 1 and self.dead_window >= 1,
             "stats_interval, shadow_interval and dead_window must be >= 1"),
            (not (self.format and self.policy), "give either format (one format everywhere) or policy, not both"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.weight_storage in (None, *WEIGHT_STORAGES), f"weight_storage must be one of {', '.join(WEIGHT_STORAGES)}"),
            (self.update_rounding in (None, *ROUNDINGS), f"update_rounding must be one of {', '.join(ROUNDINGS)}"),
            (self.sr_bits is None or (isinstance(self.sr_bits, int) and not isinstance(self.sr_bits, bool)
                                      and 1 <= self.sr_bits <= 30), "sr_bits must be an integer from 1 to 30"),
            (self.compensation in COMPENSATIONS, f"compensation must be one of {', '.join(COMPENSATIONS)}"),
            (self.compensation_dtype in COMPENSATION_DTYPES,
             f"compensation_dtype must be one of {', '.join(COMPENSATION_DTYPES)}"),
            (self.grid_direction in GRID_DIRECTIONS, f"grid_direction must be one of {', '.join(GRID_DIRECTIONS)}"),
            (self.grid_lr_unit in GRID_LR_UNITS, f"grid_lr_unit must be one of {', '.join(GRID_LR_UNITS)}"),
            (self.grid_lr >= 0 and self.rung_clip >= 1, "need grid_lr >= 0 and rung_clip >= 1"),
            (self.max_stiffness is None or self.max_stiffness > 0, "max_stiffness must be > 0"),
            (self.grad_clip_mode in CLIP_MODES, f"grad_clip_mode must be one of {', '.join(CLIP_MODES)}"),
            (self.shift_patience >= 1, "shift_patience must be >= 1"),
            (self.rank_interval >= 1 and 0 < self.rank_threshold < 1 and 0 < self.critical_threshold_multiplier <= 1
             and 0 < self.rank_window <= 1,
             "need rank_interval >= 1, 0 < rank_threshold < 1, 0 < critical_threshold_multiplier <= 1 and "
             "0 < rank_window <= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"bad config: {message}")
        storage, rounding = ARM_DEFAULTS[self.optimizer]
        object.__setattr__(self, "weight_storage", self.weight_storage or storage)
        object.__setattr__(self, "update_rounding", self.update_rounding or rounding)
        policy = self.quant_policy()  # a bad format or rule fails here, before any work
        self._check_arm(policy)

    def _check_arm(self, policy: QuantPolicy | None) -> None:
        """The geometry optimizers and format storage need weights with a format (stored or FP32 masters)."""
        configs = [rule.config for rule in (policy.rules if policy else ()) if rule.config is not None]
        with_format = [c for c in configs if c.weight is not None]
        if self.optimizer != "adamw" and not with_format:
            raise UserError(f"bad config: optimizer {self.optimizer} moves weights on a format's grid; "
                            "give a weight format (--format or a policy)")
        if self.weight_storage == "format" and not with_format:
            raise UserError("bad config: weight_storage format needs a weight format (--format or a policy)")
        stored = [c for c in with_format if c.weight_storage == "format"]
        if self.optimizer == "eco" and not stored:
            raise UserError("bad config: optimizer eco feeds the rounding error of stored weights back into Adam's "
                            "moment; it needs weight_storage format (on FP32 masters it would be AdamW)")
        if self.compensation != "none" and not stored:
            raise UserError(f"bad config: compensation {self.compensation} keeps what the grid could not hold; "
                            "it needs weight_storage format")
        if self.compensation != "none" and self.optimizer == "eco":
            raise UserError("bad config: optimizer eco and compensation kahan both feed the rounding error back; "
                            "choose one")

    def quant_policy(self) -> QuantPolicy | None:
        """The Linear-layer policy: None for a plain FP32/BF16 run."""
        defaults = {key: getattr(self, key) for key in POLICY_DEFAULT_KEYS}
        defaults["gradient"] = self.grad_format
        if self.policy:
            return build_policy(list(self.policy), defaults)
        if self.format:
            return build_policy([{"layers": "*", "format": self.format}], defaults)
        return None

    @property
    def label(self) -> str:
        """What the run computes in: bf16, e5m2, mixed, ..."""
        if self.policy:
            return "mixed"
        return self.format.lower().replace(":", "-").replace("=", "") if self.format else self.precision

    @property
    def arm(self) -> str:
        """How weights are updated: ``adamw`` (FP32 masters, the standard recipe: arm A), else
        ``<optimizer>[-momentum]-<master | rtn | sr | mixed>``: the storage and update rounding
        of the layers with a weight format (``mixed`` when policy rules set them differently).

        adamw-rtn, adamw-sr: arms B, C; manifold-sr (-rtn): arm D; grid-sr (-rtn): arm E;
        manifold-master and grid-master: the geometry update rules on FP32 masters, where the
        format's grid only sizes the step (DESIGN §5.2: the update-rule effect, without storage);
        eco-rtn (-sr): ECO's error feedback. Compensated storage appends ``-kahan`` (adamw-rtn-kahan:
        the arm C-kahan). The ``grid_lr_unit`` is not part of the tag (a config setting, recorded
        with the run)."""
        def tag(storage: str, rounding: str) -> str:
            return "master" if storage == "master" else {"nearest": "rtn", "stochastic": "sr"}[rounding]

        policy = self.quant_policy()
        configs = [rule.config for rule in (policy.rules if policy else ()) if rule.config is not None]
        # the layers with a weight format decide; without any, the policy-wide setting
        kinds = {tag(c.weight_storage, c.update_rounding) for c in configs if c.weight is not None} or \
            {tag(self.weight_storage, self.update_rounding)}
        how = kinds.pop() if len(kinds) == 1 else "mixed"
        if self.optimizer == "adamw" and how == "master":
            return "adamw"
        direction = "-momentum" if self.optimizer == "grid" and self.grid_direction == "momentum" else ""
        compensation = "" if self.compensation == "none" else f"-{self.compensation}"
        return f"{self.optimizer}{direction}-{how}{compensation}"

    @property
    def name(self) -> str:
        """Default: <preset>-<label>[-<arm>]-seed<seed> (the standard AdamW arm unnamed)."""
        arm = "" if self.arm == "adamw" else f"-{self.arm}"
        return self.run_name or f"{self.preset}-{self.label}{arm}-seed{self.seed}"

    def optimizer_spec(self) -> OptimizerSpec:
        """The optimizer's settings: every `OptimizerSpec` field the config has, by name, and
        ``name`` (``optimizer``) and ``betas`` (``beta1``, ``beta2``); the rest keep their defaults."""
        same = {f.name: getattr(self, f.name) for f in fields(OptimizerSpec) if f.name in FIELD_NAMES}
        return OptimizerSpec(name=self.optimizer, betas=(self.beta1, self.beta2), **same)

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.max_steps

    @property
    def floor_lr(self) -> float:
        """The final lr of the cosine decay (absolute): ``min_lr`` when given, else
        ``lr * min_lr_ratio``, else ``lr * DEFAULT_MIN_LR_RATIO``. The one place the rule lives."""
        if self.min_lr is not None:
            return self.min_lr
        return self.lr * (DEFAULT_MIN_LR_RATIO if self.min_lr_ratio is None else self.min_lr_ratio)

    @property
    def warmup(self) -> int:
        """Warmup steps: ``round(warmup_ratio * max_steps)`` when ``warmup_ratio`` is given (then
        ``warmup_steps`` is ignored), else ``warmup_steps``. The one place the rule lives."""
        if self.warmup_ratio is not None:
            return round(self.warmup_ratio * self.max_steps)
        return self.warmup_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.block_size

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["tags"] = list(self.tags)
        data["critical_layers"] = list(self.critical_layers)
        data["policy"] = [dict(rule) for rule in self.policy]
        return data


#: The floor of the schedule as a fraction of the peak lr when neither min_lr nor min_lr_ratio is given.
DEFAULT_MIN_LR_RATIO = 0.1

#: Presets: tiny is for tests (seconds), small is nanoGPT's CPU config (minutes on a laptop),
#: paper is the GPU config of the original plan. None sets a floor: each decays to
#: DEFAULT_MIN_LR_RATIO of its own lr (the absolute floors they had were that ratio).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, max_steps=60, lr=3e-3,
                 warmup_steps=5, eval_interval=20, eval_iters=4, log_interval=5, checkpoint_interval=20),
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_steps=2000, lr=1e-3,
                  warmup_steps=100, eval_interval=250, eval_iters=20, log_interval=10, checkpoint_interval=250),
    "paper": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=12, max_steps=2000, lr=6e-4,
                  warmup_steps=100, grad_clip=1.0, eval_interval=250, eval_iters=100, log_interval=10,
                  checkpoint_interval=250),
}

CONFIG_FILE_NAME = "config.yaml"


# ---- the fields' metadata --------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One config field as `option` declared it (see there for the meaning of each part)."""
    name: str
    type: str  # as annotated: "int", "float | None", "tuple[str, ...]", ...
    default: Any
    help: str
    section: str
    unit: str
    result: bool
    axis: str | None
    resumable: bool
    cli: bool | tuple[str, ...]
    per_layer: bool

    @property
    def pairing(self) -> str:
        """How `compare` pairs runs on it: ``equal`` (paired runs agree), ``precision`` or ``arm``
        (the axes a comparison varies) or ``free`` (names, places, measurements)."""
        return self.axis or ("equal" if self.result else "free")


def settings(cls: type = TrainConfig) -> tuple[Setting, ...]:
    """Every field of ``cls`` (`TrainConfig` or a subclass) with its metadata, in field order;
    a field declared without `option` is an error."""
    out = []
    for f in fields(cls):
        if _META not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is declared without option(...): give its help, section "
                            "and whether it changes the result")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kind = f.type.__name__ if type(f.type) is type else str(f.type)  # "float", also without postponed annotations
        out.append(Setting(name=f.name, type=kind, default=default, **f.metadata[_META]))
    return tuple(out)


def sections(cls: type = TrainConfig) -> dict[str, tuple[Setting, ...]]:
    """section -> its settings, in `SECTIONS` order (empty sections left out)."""
    every = settings(cls)
    grouped = {name: tuple(s for s in every if s.section == name) for name in SECTIONS}
    return {name: group for name, group in grouped.items() if group}


def keys_where(cls: type = TrainConfig, **wanted: Any) -> frozenset[str]:
    """The names of the settings whose metadata has every ``wanted`` value, e.g. ``result=False``."""
    return frozenset(s.name for s in settings(cls) if all(getattr(s, k) == v for k, v in wanted.items()))


FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
SETTINGS = {s.name: s for s in settings()}
#: The policy-wide defaults of every rule (a rule may set them per layer).
POLICY_DEFAULT_KEYS = tuple(name for name, s in SETTINGS.items() if s.per_layer)
#: What ``--resume`` may change: where the run is, how long it runs, where it reports.
RESUMABLE_KEYS = keys_where(resumable=True)


def flatten(values: dict[str, Any], origin: str, cls: type = TrainConfig) -> dict[str, Any]:
    """Flat keys as they are; a section (``schedule: {lr: 0.002}``) as its keys. A section name
    that is also a key (``data``, ``precision``, ``optimizer``) is a section when its value is a
    mapping (no setting takes one). Unknown keys stay for `_check_keys`; a key in the wrong
    section, an unknown key in a section or a key given twice is a one-line error."""
    known = {s.name: s for s in settings(cls)}
    out: dict[str, Any] = {}

    def put(key: str, value: Any, where: str) -> None:
        if key in out:
            raise UserError(f"config key {key} is given twice in {origin} ({where})")
        out[key] = value

    for key, value in values.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                setting = known.get(inner)
                if setting is None:
                    keys = ", ".join(s.name for s in settings(cls) if s.section == key)
                    raise UserError(f"unknown config key {inner} in section {key} of {origin}; its keys: {keys}")
                if setting.section != key:
                    raise UserError(f"config key {inner} belongs in section {setting.section}, not {key} "
                                    f"(in {origin}), or give it at the top level")
                put(inner, inner_value, f"in section {key}")
        elif key in SECTIONS and key not in known:
            raise UserError(f"section {key} in {origin} must be a mapping of its keys to values, got {value!r}")
        else:
            put(key, value, "at the top level and in its section")
    return out


def _check_keys(values: dict[str, Any], origin: str) -> None:
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)} in {origin}; valid keys: {', '.join(FIELD_NAMES)}")


def read_yaml(path: Path, _including: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping (safe_load), with a clear error for anything else.

    ``base: other.yaml`` (relative to the file) composes configs: the base's keys first, then
    this file's on top; bases may have bases. ``key: null`` in the file unsets a base's value.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        where = f" (base of {_including[-1]})" if _including else ""
        raise UserError(f"config file {path} not found{where}") from None
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of keys to values")
    base = data.pop("base", None)
    data = flatten(data, str(path))
    if base is not None:
        base_path = path.parent / str(base)
        if base_path.resolve() in {p.resolve() for p in (*_including, path)}:
            raise UserError(f"config file {path}: base {base} includes itself")
        data = {**read_yaml(base_path, (*_including, path)), **data}
    _check_keys(data, str(path))
    return data


def coerce(values: dict[str, Any], origin: str) -> dict[str, Any]:
    """Check each value against its field's type (YAML gives ints for floats, lists for tuples)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        kind = types[key]
        if value is None:
            if "None" not in str(kind):
                raise UserError(f"{key} in {origin} cannot be empty")
        elif kind in ("float", "float | None") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif kind.startswith("tuple"):
            value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        expected = {"int": int, "float": float, "bool": bool, "str": str}.get(kind.split(" | ")[0])
        if value is not None and expected is not None:
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise UserError(f"{key} in {origin} must be {kind}, got {value!r}")
        out[key] = value
    return out


def resolve_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < preset < YAML file < overrides (None values in overrides are ignored)."""
    file_values = read_yaml(path) if path else {}
    cli_values = {k: v for k, v in flatten(overrides or {}, "command-line options").items() if v is not None}
    _check_keys(cli_values, "command-line options")
    preset = cli_values.get("preset", file_values.get("preset", TrainConfig.preset))
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    merged = {**PRESETS[preset], **coerce(file_values, str(path)), **coerce(cli_values, "command-line options")}
    merged["preset"] = preset
    return TrainConfig(**merged)


def config_from_dict(values: dict[str, Any], origin: str) -> TrainConfig:
    """Rebuild a saved config (e.g. a run's config.yaml on resume); flat keys or sections."""
    values = flatten(values, origin)
    _check_keys(values, origin)
    return TrainConfig(**coerce(values, origin))
