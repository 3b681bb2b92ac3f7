"""Model surgery: swap ``nn.Linear`` modules for `QuantizedLinear` after the model is built.

A `QuantPolicy` is an ordered list of rules; each rule's pattern is matched against a Linear's
fully-qualified name (``fnmatch`` style: ``lm_head``, ``*.attn.c_proj``, ``*.mlp.*``) and the
first match decides. A rule without a config, and any layer no rule matches, keeps the layer
in high precision. The model's own code never learns about FP8.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import UserError
from ..quantization.formats import FormatError, get_format
from ..quantization.linear import GEMM_DTYPES, LinearQuantConfig, QuantizedLinear
from ..quantization.quantize import ROUNDINGS
from ..quantization.scaling import SCALING_MODES, ScalingConfig

#: Format names that mean "leave this operand or layer in high precision".
HIGH_PRECISION = ("bf16", "fp32", "none", "high")


@dataclass(frozen=True)
class PolicyRule:
    pattern: str
    config: LinearQuantConfig | None  # None: keep the layer in high precision


@dataclass(frozen=True)
class LayerAssignment:
    """What surgery did to one Linear layer."""

    name: str
    pattern: str | None  # the rule that matched, None when none did
    config: LinearQuantConfig | None

    @property
    def quantized(self) -> bool:
        return self.config is not None


@dataclass(frozen=True)
class QuantPolicy:
    rules: tuple[PolicyRule, ...]

    def match(self, name: str) -> PolicyRule | None:
        return next((rule for rule in self.rules if fnmatch.fnmatchcase(name, rule.pattern)), None)

    @property
    def is_empty(self) -> bool:
        return all(rule.config is None for rule in self.rules)


#: Keys of one rule in a YAML policy (besides ``layers``) and of the defaults they fall back on.
RULE_KEYS = ("format", "weight", "activation", "gradient", "rounding", "grad_rounding", "scaling",
             "amax_history_len", "scale_margin", "power_of_two_scales", "gemm_dtype", "weight_storage",
             "update_rounding", "sr_bits")


def _operand_format(value: Any, where: str):
    if value is None or str(value).lower() in HIGH_PRECISION:
        return None
    try:
        return get_format(str(value))
    except FormatError as error:
        raise UserError(f"{where}: {error}") from None


def rule_config(rule: dict[str, Any], defaults: dict[str, Any], where: str) -> LinearQuantConfig | None:
    """One rule mapping (``format`` or per-operand ``weight``/``activation``/``gradient``) as a layer config.

    ``format`` sets weights and activations; gradients use ``gradient`` else the default
    gradient format. ``format: bf16`` (or fp32/none) keeps the whole layer in high precision.
    """
    unknown = sorted(set(rule) - set(RULE_KEYS) - {"layers"})
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: layers, {', '.join(RULE_KEYS)}")
    values = {**defaults, **rule}
    if "format" in rule and str(rule["format"]).lower() in HIGH_PRECISION and not (
        {"weight", "activation", "gradient"} & set(rule)
    ):
        return None
    layer_format = values.get("format")
    weight = _operand_format(values.get("weight", layer_format), where)
    activation = _operand_format(values.get("activation", layer_format), where)
    gradient = _operand_format(values.get("gradient"), where)
    if weight is None and activation is None and gradient is None:
        return None
    if weight is None and "weight_storage" not in rule:
        values["weight_storage"] = "master"  # a policy-wide storage applies to layers with a weight format
    for key, allowed in (("rounding", ROUNDINGS), ("grad_rounding", ROUNDINGS), ("scaling", SCALING_MODES),
                         ("gemm_dtype", tuple(GEMM_DTYPES))):
        if values[key] not in allowed:
            raise UserError(f"{where}: {key} must be one of {', '.join(allowed)}, got {values[key]!r}")
    try:
        scaling = ScalingConfig(mode=values["scaling"], history_len=int(values["amax_history_len"]),
                                margin=int(values["scale_margin"]), power_of_two=bool(values["power_of_two_scales"]))
        return LinearQuantConfig(weight=weight, activation=activation, gradient=gradient,
                                 rounding=values["rounding"], grad_rounding=values["grad_rounding"],
                                 scaling=scaling, gemm_dtype=values["gemm_dtype"],
                                 weight_storage=values.get("weight_storage", "master"),
                                 update_rounding=values.get("update_rounding", "nearest"),
                                 sr_bits=values.get("sr_bits"))
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None


def build_policy(rules: list[dict[str, Any]], defaults: dict[str, Any]) -> QuantPolicy:
    """A policy from rule mappings, each with a ``layers`` pattern (or list of patterns)."""
    built = []
    for index, rule in enumerate(rules):
        where = f"policy rule {index + 1}"
        if not isinstance(rule, dict) or "layers" not in rule:
            raise UserError(f"{where} must be a mapping with a 'layers' pattern, e.g. {{layers: '*.mlp.*', format: E3M4}}")
        patterns = rule["layers"] if isinstance(rule["layers"], list) else [rule["layers"]]
        config = rule_config(rule, defaults, where)
        built.extend(PolicyRule(str(pattern), config) for pattern in patterns)
    return QuantPolicy(tuple(built))


def quantize_model(model: nn.Module, policy: QuantPolicy, seed: int = 0) -> list[LayerAssignment]:
    """Swap the Linear layers the policy selects for QuantizedLinear, in place.

    Parameters are shared, not copied (weight tying and optimizer state survive). Returns what
    happened to every Linear layer, in model order. A pattern that matches no Linear is an
    error: a typo would otherwise silently leave the model in high precision.
    """
    linears = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and not isinstance(module, QuantizedLinear)]
    names = [name for name, _ in linears]
    for rule in policy.rules:
        if not any(fnmatch.fnmatchcase(name, rule.pattern) for name in names):
            raise UserError(f"policy pattern {rule.pattern!r} matches no Linear layer; layers: {', '.join(names)}")
    assignments = []
    for name, module in linears:
        rule = policy.match(name)
        config = rule.config if rule else None
        if config is not None:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, QuantizedLinear.from_linear(module, config, name=name, seed=seed))
        assignments.append(LayerAssignment(name, rule.pattern if rule else None, config))
    return assignments


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
