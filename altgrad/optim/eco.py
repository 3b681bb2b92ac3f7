"""ECO: AdamW on stored weights whose rounding error is fed back into Adam's first moment.

Nikdan, Zandieh, Alistarh, Mirrokni, "ECO: Quantized Training without Full-Precision Master
Weights", arXiv 2601.22101v1 (January 2026): Algorithm 3 (ECO for Adam; Algorithm 2 is the
same for SGD with momentum). Per stored weight and step t (counted from 1), learning rate
``eta_t`` of the schedule, Adam's moments ``m``, ``v``::

    w~_t = w^_{t-1} - eta_t (m_t / (1 - beta1^t) / (sqrt(v_t / (1 - beta2^t)) + eps) + wd w^_{t-1})
    w^_t = Q(w~_t)                                   # stored on the grid, nearest or stochastic
    e_t  = w~_t - w^_t                               # what the grid could not hold
    m_t <- m_t + (1 - beta1^t) / eta_t * (1 - 1/beta1) * (sqrt(v_t / (1 - beta2^t)) + eps) * e_t

The first line is arm B's (or C's) step (`StoredAdamW`), the same operations; the last is the
momentum injection, applied after the weight landed, so the next step's update carries ``e_t``.
Why this form: master weights would be ``w* = w^ + e``. Adam's step is ``-eta m * h`` with
the elementwise ``h = 1 / ((1 - beta1^t)(sqrt(v_hat) + eps))``; ``w~`` follows ``w*`` exactly
when the momentum is ``m~_t + (1/eta) e_{t-1} / h - (1/(beta1 eta)) e_t / h`` (the error carried
into the next step, minus the previous one, which the current step already carried). ECO takes
``e_{t-1} ~ e_t``, which gives the factor ``(1 - 1/beta1)`` (negative: the error is subtracted
in the momentum's units) and needs no buffer for the previous error. So the optimizer state of
a stored weight is Adam's two moments and nothing else: no master, no error buffer (the error
is a temporary of the step). Approximations the paper makes and this code keeps: ``v_t`` and
``eta_t`` stand in for the next step's; the decoupled weight decay's factor ``(1 - eta wd)`` on
the carried error is dropped (Cesista 2026, "Error-Compensating Optimizers: Handling Weight
Decay and Matrix LMOs", restores it; it is ``1 - 1e-4`` at the presets' lr and wd). A step with
``eta_t = 0`` moves nothing and injects nothing (the coefficient would be 0/0).

Parameters without a stored format take torch's AdamW. ``update_rounding`` defaults to
nearest for ECO (its feedback is the remedy for stalling, where arm B has none); stochastic is
allowed (the paper's best variant).
"""

from __future__ import annotations

import torch

from .adamw import StoredAdamW


def injection(m: torch.Tensor, v: torch.Tensor, error: torch.Tensor, hyper: list[float], lr: float,
              step: int) -> None:
    """ECO's momentum injection (module doc, last line), in place on ``m``: ``error`` times
    Adam's denominator ``sqrt(v) / sqrt(1 - beta2^t) + eps`` (the operations of
    `GridAwareOptimizer.adam_direction`) times ``(1 - beta1^t) / lr * (1 - 1/beta1)``.
    ``error`` is left as it was."""
    beta1, inv_bias2_sqrt, eps = hyper[0], hyper[4], hyper[5]
    denominator = v.double().sqrt_().float().mul_(inv_bias2_sqrt).add_(eps)  # adam_direction's, rounded alike
    m.addcmul_(error, denominator, value=(1 - beta1**step) / lr * (1 - 1 / beta1))


class EcoAdamW(StoredAdamW):
    """AdamW on stored weights with ECO's error feedback into the first moment (no master, no extra buffer)."""

    keeps_intended = True

    def landed(self, group: dict, param: torch.Tensor, step: int, intended: torch.Tensor | None) -> None:
        lr = group["lr"]
        if lr == 0:
            return
        state = self.state[param]
        error = intended.sub_(param.detach())  # e = w~ - w^
        injection(state["exp_avg"], state["exp_avg_sq"], error, self.adam_hyper(group, step), lr, step)
