"""The optimizer equals PyTorch's Adam + OneCycleLR (lr and beta1), numbers from torch 2.13."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from histo_jax import optim
from histo_jax.config import get_base_config

REF = os.path.join(os.path.dirname(__file__), "fixtures", "onecycle_reference.json")


def _opt_cfg(clip=0.0):
    cfg = ml_collections.ConfigDict(get_base_config().optimizer.to_dict())
    cfg.grad_clip_norm = clip
    return cfg


def test_schedules_match_pytorch_onecycle():
    ref = json.load(open(REF))
    lr, b1 = optim.make_schedules(_opt_cfg(), ref["total_steps"])
    steps = np.arange(ref["total_steps"])
    np.testing.assert_allclose(np.asarray(lr(steps)), ref["lr"], rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(np.asarray(b1(steps)), ref["beta1"], rtol=1e-6)
    np.testing.assert_allclose(float(lr(0)), 3e-4 / 25, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10**6)), 3e-4 / 25 / 1e4, rtol=1e-4)  # holds the end


def test_adam_trajectory_matches_pytorch():
    """Same gradients -> same parameters as torch.optim.Adam driven by OneCycleLR."""
    ref = json.load(open(REF))
    tx = optim.make_optimizer(_opt_cfg(), ref["total_steps"])
    p = jnp.zeros(3)
    state = tx.init(p)
    g = jnp.asarray(ref["grad"])
    for k in range(ref["total_steps"]):
        upd, state = tx.update(g * (1 + (k + 1) % 3), state, p)
        p = optax.apply_updates(p, upd)
        np.testing.assert_allclose(np.asarray(p), ref["params"][k], rtol=2e-4, atol=1e-7)


def test_gradients_are_clipped_to_global_norm_before_adam():
    """A norm-50 gradient then a norm-0.5 one: with clipping, Adam sees (g1/50, g2)."""
    g1, g2 = jnp.array([30.0, -40.0, 0.0]), jnp.array([0.0, 0.3, 0.4])
    p = jnp.zeros(3)

    def two_steps(tx, a, b):
        s = tx.init(p)
        _, s = tx.update(a, s, p)
        return np.asarray(tx.update(b, s, p)[0])

    clipped = two_steps(optim.make_optimizer(_opt_cfg(clip=1.0), 100), g1, g2)
    manual = two_steps(optim.make_optimizer(_opt_cfg(clip=0.0), 100), g1 / 50.0, g2)
    unclipped = two_steps(optim.make_optimizer(_opt_cfg(clip=0.0), 100), g1, g2)
    np.testing.assert_allclose(clipped, manual, rtol=1e-5)
    assert not np.allclose(clipped, unclipped, rtol=1e-2)


def test_flat_optimizer_equals_the_per_tensor_one():
    """The trainer's optimizer on one flat vector == the same chain tensor by tensor, over
    several steps of a tree of differently shaped parameters (the clip active)."""
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
              "b": {"c": jnp.asarray(rng.standard_normal(5), jnp.float32)}}
    out = []
    for flat in (True, False):
        tx = optim.make_optimizer(_opt_cfg(clip=1.0), 20, flat=flat)
        p, s = params, tx.init(params)
        for k in range(6):
            g = jax.tree.map(lambda x: jnp.sin(x * (k + 1)) * 3.0, p)
            upd, s = tx.update(g, s, p)
            p = optax.apply_updates(p, upd)
        out.append(p)
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert not np.allclose(np.asarray(out[0]["a"]), np.asarray(params["a"]))
