"""Training configuration: one dataclass, presets, YAML files and command-line overrides.

Precedence: dataclass defaults < preset < YAML file < command-line flags. Unknown keys are
errors that list the valid ones; the resolved config is saved with every run.
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
POLICY_DEFAULT_KEYS = ("rounding", "grad_rounding", "scaling", "amax_history_len", "scale_margin",
                       "power_of_two_scales", "gemm_dtype", "weight_storage", "update_rounding", "sr_bits")
#: What an optimizer implies when weight_storage / update_rounding are not given (DESIGN §4 arms):
#: adamw -> FP32 masters (arm A; with format storage, nearest: arm B); manifold -> D; grid -> E;
#: eco -> stored, round-to-nearest (its error feedback is the remedy for stalling, Nikdan et al.).
#: The geometry arms on FP32 masters (manifold-master, grid-master: the same update rule, the
#: grid only sizes the step) take ``weight_storage: master`` explicitly.
ARM_DEFAULTS = {"adamw": ("master", "nearest"), "manifold": ("format", "stochastic"),
                "grid": ("format", "stochastic"), "eco": ("format", "nearest")}


@dataclass(frozen=True)
class TrainConfig:
    # run
    run_name: str | None = None  # default: <preset>-<precision>-seed<seed>
    runs_dir: str = "runs"
    preset: str = "small"
    seed: int = 1337
    device: str = "auto"
    compile: bool = False
    compile_mode: str = "exact"  # exact: bit-identical to eager (ATen kernels); fused: inductor's fusion
    adapt_threads: bool = True  # fewer CPU threads while the process gets fewer CPUs (training/threads.py)
    # data
    data: str | None = None  # prepared data directory; default data/eurlex, else the built-in corpus
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = True
    # optimisation
    precision: str = "bf16"
    batch_size: int = 12
    grad_accum: int = 1
    max_steps: int = 2000
    lr: float = 1e-3
    # The schedule (training/setup.py `learning_rate`): linear warmup to lr, cosine decay to the
    # floor `floor_lr` at decay_steps, then flat. Its shape is set as fractions, so that arms
    # with different peaks decay alike (DESIGN §5.1):
    min_lr: float | None = None  # the floor, absolute (older configs); not together with min_lr_ratio
    min_lr_ratio: float | None = None  # the floor as a fraction of lr, 0..1 (default 0.1 when min_lr is not given)
    warmup_steps: int = 100  # warmup in steps; ignored when warmup_ratio is given
    warmup_ratio: float | None = None  # warmup as a fraction of max_steps (round(ratio * max_steps) steps), 0 <= r < 1
    lr_decay_steps: int | None = None  # default: max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    grad_clip_mode: str = "global"  # global: one L2 norm; partition: per gradient format (training/clipping.py)
    nan_patience: int = 5
    # the optimizer and where weights live (DESIGN §4): adamw | manifold | grid | eco; master | format.
    # eco: AdamW on stored weights whose rounding error is fed back into Adam's first moment (optim/eco.py)
    optimizer: str = "adamw"
    weight_storage: str | None = None  # default: master for adamw, format for manifold, grid and eco
    update_rounding: str | None = None  # format storage: default nearest for adamw and eco, else stochastic
    # compensated storage (optim/storage.py): kahan keeps, per stored weight, the part of w + delta its
    # grid could not hold and adds it to the next step's w + delta before rounding; none: no buffer
    compensation: str = "none"
    compensation_dtype: str = "bfloat16"  # the compensation buffer's dtype: bfloat16 | float16 | float32
    grid_lr: float = 0.5  # manifold: ULPs per step; grid: rungs per step (format weights; same schedule as lr)
    # grid_lr's unit: ulp (grid_lr ULPs or rungs per step) | binade (grid_lr * 2^M of them for a weight whose
    # format has M mantissa bits, i.e. a manifold step of grid_lr * 2^floor(log2|w s|) / s times Adam's
    # direction, the same for every M: one sweep range serves every format). Read from each weight's format
    # at step time (an emergency shift changes it).
    grid_lr_unit: str = "ulp"
    max_stiffness: float | None = None  # manifold: cap on the stiffness S(w) (absolute)
    rung_clip: int = 4  # grid: most rungs a weight moves in one step
    grid_direction: str = "adam"  # grid: adam | momentum
    # simulated low precision (DESIGN §2): `format` puts every Linear in one format; `policy`
    # (a list of rules {layers: pattern, format | weight/activation/gradient, ...}) mixes them.
    format: str | None = None
    grad_format: str = "E5M2"
    rounding: str = "nearest"
    grad_rounding: str = "nearest"
    # the random bits of every stochastic rounding (weights, activations, gradients, update rounding):
    # N in 1..30 rounds with N bits as hardware does (the fraction of a grid step truncated to N bits:
    # biased toward zero by less than 2^-N of a step; quantization/kernel.py); None: the exact rule
    sr_bits: int | None = None
    scaling: str = "current"
    amax_history_len: int = 16
    scale_margin: int = 0
    power_of_two_scales: bool = True
    gemm_dtype: str = "bf16"
    policy: tuple[dict, ...] = field(default_factory=tuple)
    # emergency mantissa shift (training/shift.py): a layer that overflows (or stalls) in
    # shift_patience measurements in a row moves to one more exponent (or mantissa) bit
    format_shift: bool = False
    shift_patience: int = 3
    # monitoring: quantization statistics, bit-stall, dead units, the FP32 gradient shadow
    stats_interval: int = 10
    dead_window: int = 100
    use_shadow: bool = False
    shadow_interval: int = 10
    overflow_threshold: float = 0.001
    underflow_threshold: float = 0.5
    bit_stall_threshold: float = 0.99
    grad_cos_threshold: float = 0.9
    # rank health: every rank_interval steps; a warning when a layer's effective rank falls more
    # than rank_threshold below its step-0 value (critical layers: times the multiplier)
    rank_interval: int = 100
    rank_threshold: float = 0.3
    critical_layers: tuple[str, ...] = ("lm_head", "*.attn.c_proj")
    critical_threshold_multiplier: float = 0.5
    # evaluation, checkpoints, tracking
    eval_interval: int = 250
    eval_iters: int = 20
    log_interval: int = 10
    checkpoint_interval: int = 250
    keep_checkpoints: int = 2
    wandb: str = "disabled"
    wandb_project: str = "altgrad"
    tags: tuple[str, ...] = field(default_factory=tuple)

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
            (self.rank_interval >= 1 and 0 < self.rank_threshold < 1 and 0 < self.critical_threshold_multiplier <= 1,
             "need rank_interval >= 1, 0 < rank_threshold < 1 and 0 < critical_threshold_multiplier <= 1"),
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
        return OptimizerSpec(name=self.optimizer, lr=self.lr, grid_lr=self.grid_lr, weight_decay=self.weight_decay,
                             betas=(self.beta1, self.beta2), max_stiffness=self.max_stiffness,
                             rung_clip=self.rung_clip, grid_direction=self.grid_direction,
                             grid_lr_unit=self.grid_lr_unit, compensation=self.compensation,
                             compensation_dtype=self.compensation_dtype)

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
FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))


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
    cli_values = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_keys(cli_values, "command-line options")
    preset = cli_values.get("preset", file_values.get("preset", TrainConfig.preset))
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    merged = {**PRESETS[preset], **coerce(file_values, str(path)), **coerce(cli_values, "command-line options")}
    merged["preset"] = preset
    return TrainConfig(**merged)


def config_from_dict(values: dict[str, Any], origin: str) -> TrainConfig:
    """Rebuild a saved config (e.g. a run's config.yaml on resume)."""
    _check_keys(values, origin)
    return TrainConfig(**coerce(values, origin))
