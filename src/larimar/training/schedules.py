"""The schedules of a run: the cyclic KL weight, the learning-rate factor, and the schedules' length."""

from __future__ import annotations

import math

from larimar.training.config import OptimConfig


def beta_schedule(step: int, total: int, beta_max: float, cycles: int) -> float:
    """Cyclic KL weight: per cycle, half at 0, a quarter ramping linearly to beta_max, a quarter flat."""
    if beta_max == 0 or cycles <= 0 or total <= 0:
        return 0.0
    period = total / cycles
    t = (step % period) / period
    if t < 0.5:
        return 0.0
    if t < 0.75:
        return beta_max * (t - 0.5) / 0.25
    return beta_max


def scheduled_total(step: int, elapsed_s: float, cfg: OptimConfig) -> int:
    """Length of the learning-rate and KL schedules: ``cfg.steps``, or with ``schedule: time`` the step count
    projected from the elapsed fraction of ``max_minutes`` (never below ``step + 1``, never above ``cfg.steps``)."""
    if cfg.schedule != "time" or step < max(1, cfg.warmup_steps):
        return cfg.steps
    frac = elapsed_s / (60.0 * cfg.max_minutes)
    if frac <= 0:
        return cfg.steps
    return max(step + 1, min(cfg.steps, round(step / frac)))


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
