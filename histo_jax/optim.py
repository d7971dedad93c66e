"""Optimizer of the reference: Adam + PyTorch-style OneCycle (lr and beta1) + global-norm clipping.

PyTorch's ``OneCycleLR(max_lr, total_steps, pct_start=0.3, anneal_strategy='cos',
div_factor=25, final_div_factor=1e4, cycle_momentum=True, base_momentum=0.85,
max_momentum=0.95)`` stepped once per batch, reproduced exactly: optimizer step ``k``
(0-based) uses ``lr(k)`` and ``beta1(k)``. Adam's bias correction uses the current beta1,
as PyTorch's does.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax


def _cos_anneal(start, end, pct):
    return end + (start - end) / 2.0 * (jnp.cos(jnp.pi * pct) + 1.0)


def one_cycle(total_steps: int, start: float, peak: float, end: float, pct_start: float):
    """PyTorch two-phase OneCycle curve: ``start -> peak`` (cosine) then ``peak -> end``.

    Phase boundaries follow torch exactly: phase 1 ends at step ``pct_start * total - 1``,
    phase 2 at ``total - 1``. Steps past the end hold the final value.
    """
    if total_steps < 2:
        raise ValueError(f"OneCycle needs at least 2 steps, got total_steps={total_steps}.")
    end1 = float(pct_start * total_steps) - 1.0
    end2 = float(total_steps - 1)

    def schedule(step):
        step = jnp.minimum(jnp.asarray(step, jnp.float32), end2)
        pct1 = jnp.where(end1 > 0, step / jnp.maximum(end1, 1e-12), 1.0)
        pct2 = (step - end1) / jnp.maximum(end2 - end1, 1e-12)
        return jnp.where(step <= end1, _cos_anneal(start, peak, pct1), _cos_anneal(peak, end, pct2))

    return schedule


def make_schedules(opt_cfg: ml_collections.ConfigDict, total_steps: int):
    """Returns ``(lr_schedule, beta1_schedule)`` of the reference OneCycle policy."""
    initial = opt_cfg.learning_rate / opt_cfg.div_factor
    final = initial / opt_cfg.final_div_factor
    lr = one_cycle(total_steps, initial, opt_cfg.learning_rate, final, opt_cfg.pct_start)
    # Momentum cycles inversely: max -> base during warm-up, base -> max afterwards.
    b1 = one_cycle(total_steps, opt_cfg.b1_max, opt_cfg.b1_min, opt_cfg.b1_max, opt_cfg.pct_start)
    return lr, b1


def make_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int, *,
                   flat: bool = True) -> optax.GradientTransformation:
    """Clip to global norm, then Adam with OneCycle learning rate and beta1.

    With ``flat`` (what the trainer uses) the transformation runs on all parameters
    concatenated into one vector (``optax.flatten``): the same elementwise Adam and the same
    global norm (summed in another order), the optimizer state held as one vector per
    moment. Per tensor (``flat=False``), XLA compiled ~1,500 small loops for
    EfficientNet-B0's ~240 tensors: the update took 20 s to compile and 51 ms a step on a
    2-core EPYC, flat 9 s and 27 ms.
    """
    lr, b1 = make_schedules(opt_cfg, total_steps)
    adam = optax.inject_hyperparams(optax.adam)(
        learning_rate=lr, b1=b1, b2=opt_cfg.b2, eps=opt_cfg.eps)
    chain = [adam]
    if opt_cfg.grad_clip_norm and opt_cfg.grad_clip_norm > 0:
        chain.insert(0, optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
    return optax.flatten(optax.chain(*chain)) if flat else optax.chain(*chain)
