"""One full train step of the reference configuration, on seeded weights: the histo_jax side.

Shared by ``tests/test_parity.py`` and ``scripts/make_parity_reference.py`` (which runs the
PyTorch reference on the same seeds and stores its numbers): the weights, images, labels,
class weights and OneCycle length of each case are regenerated here from the case's seed.

A step is what the trainer runs (``histo_jax.steps``): train-mode forward with dropout and
stochastic depth at 0, class-weighted cross-entropy, backward, clipping to global norm 1.0,
Adam with the OneCycle learning rate and beta1 of step 0. Outputs are keyed by PyTorch
state-dict names (``feature_extractor.*`` ...), in PyTorch layouts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from histo_jax import optim, steps
from histo_jax.config import get_base_config
from histo_jax.models import build_model, convert

# name: (weight seed, batch, number of inputs, image size); full-size EfficientNet-B0.
STEP_CASES = {"step_n1": (30, 4, 1, 64), "step_n4": (31, 4, 4, 64)}
CLASS_WEIGHTS = (0.8, 1.3333334)
TOTAL_STEPS = 100                  # OneCycle length; step 0: lr = 3e-4 / 25, beta1 = 0.95
IMAGE_SEED_OFFSET = 1000
SAMPLES_PER_TENSOR = 32            # gradient / update elements stored per parameter tensor


def step_inputs(seed: int, b: int, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (B, N, S, S, 3) float32 in [0, 1] and labels (both classes present)."""
    images = convert.synthetic_images((b, n, size, size, 3), seed + IMAGE_SEED_OFFSET)
    return images, (np.arange(b) % 2).astype(np.int32)


def sample_indices(name: str, grad: np.ndarray) -> np.ndarray:
    """The fixed elements of a parameter tensor whose gradient and update the fixture stores:
    up to ``SAMPLES_PER_TENSOR`` flat indices, drawn (seeded by the name) among the elements
    whose reference gradient is at least 1e-3 of the tensor's largest, so that the sign of
    their Adam update is not decided by float noise (Adam's first step moves every element by
    about lr * sign(g)). None for tensors of :func:`zero_grad_names`."""
    flat = np.abs(grad.ravel())
    ok = np.flatnonzero(flat >= 1e-3 * flat.max())
    rng = np.random.default_rng(list(name.encode()))
    return np.sort(rng.choice(ok, min(SAMPLES_PER_TENSOR, ok.size), replace=False))


def reference_model(seed: int, n: int, **model_fields):
    """The full-size classifier with the case's seeded weights (dropout and stochastic depth
    0), train mode, and the state dict it was filled from."""
    cfg = get_base_config()
    cfg.model.dropout = cfg.model.attn_dropout = cfg.model.stochastic_depth = 0.0
    cfg.model.update(model_fields)
    model = build_model(cfg.model, n, nnx.Rngs(params=0))
    sd = convert.synthetic_state_dict(convert.torch_shapes(model, "reference"), seed)
    convert.load_state_dict(model, sd, f"seed {seed}")
    model.train()
    return cfg, model, sd


def _torch_named(model, tree) -> dict[str, np.ndarray]:
    """``tree`` (params or batch stats of ``model``) as a PyTorch-named state dict."""
    clone = nnx.clone(model)
    nnx.update(clone, jax.device_get(tree))
    return convert.export_state_dict(clone, "reference")


# How the step is compiled: the staged chain (steps.StagedTrainStep, the CPU default) or
# one program (steps.make_grad_fn) with the encoder called once over all B x N crops, its
# statistics grouped per input (trunk 'folded', the default on other backends). The other
# per-input trunks equal these (tests/test_steps.py, tests/test_models.py).
STEP_PATHS = ("staged", "one_program")


def histo_jax_step(case: str, path: str = "staged", **model_fields) -> dict:
    """Runs the case's step compiled as ``path``; returns ``loss``, ``logits``, and
    PyTorch-named dicts ``grads``, ``stats`` (BatchNorm running statistics after the step),
    ``params`` (after the update)."""
    seed, b, n, size = STEP_CASES[case]
    model_fields.setdefault("trunk", "staged" if path == "staged" else "folded")
    cfg, model, sd = reference_model(seed, n, **model_fields)
    images, labels = step_inputs(seed, b, n, size)
    graphs, params, batch_stats = steps.split_model(model)
    tx = optim.make_optimizer(cfg.optimizer, TOTAL_STEPS)  # the trainer's (on one flat vector)
    state = steps.init_train_state(params, batch_stats, tx)
    cw = jnp.asarray(CLASS_WEIGHTS, jnp.float32)
    if path == "staged":
        staged = steps.StagedTrainStep(graphs, tx, None, "none", cw,
                                       compiler_options=steps.compiler_options())
        loss, logits, new_stats, grads, _ = staged.value_and_grad(
            state, {"images": images, "labels": labels}, jax.random.key(0))
    else:
        grad_fn = jax.jit(steps.make_grad_fn(graphs, cw), compiler_options=steps.compiler_options())
        (loss, logits, new_stats), grads = grad_fn(params, batch_stats, images, labels,
                                                   jax.random.key(0))
    new_state = jax.jit(steps.apply_gradients, static_argnums=0)(tx, state, grads, new_stats)
    names_p = set(_torch_named(model, params)) - {k for k in sd if "running_" in k}
    grads_t = _torch_named(model, grads)
    stats_t = _torch_named(model, new_stats)
    params_t = _torch_named(model, new_state.params)
    return {"loss": float(loss), "logits": np.asarray(logits),
            "grads": {k: grads_t[k] for k in sorted(names_p)},
            "stats": {k: v for k, v in stats_t.items() if "running_" in k},
            "params": {k: params_t[k] for k in sorted(names_p)},
            "initial": {k: sd[k] for k in sorted(names_p)}}


def histo_jax_forward(case: str, **model_fields) -> dict:
    """The case's train-mode forward only (no gradient): ``loss``, ``logits`` and ``stats``."""
    seed, b, n, size = STEP_CASES[case]
    _, model, _ = reference_model(seed, n, **model_fields)
    images, labels = step_inputs(seed, b, n, size)
    logits, _ = nnx.jit(lambda m, x: m(x))(model, images)
    loss = steps.weighted_cross_entropy(logits, labels, jnp.asarray(CLASS_WEIGHTS, jnp.float32))
    stats = convert.export_state_dict(model, "reference")
    return {"loss": float(loss), "logits": np.asarray(logits),
            "stats": {k: v for k, v in stats.items() if "running_" in k}}


# Bounds of the parity test (tests/test_parity.py) on the errors of :func:`step_errors`.
TOLERANCES = {
    "loss": 1e-4,            # absolute
    "logits": 1e-4,          # max absolute
    "stats": 1e-4,           # every BatchNorm running mean / var: rel_err, whole tensors
    "grads": 1e-3,           # stored elements: max |diff| / the tensor's max |g|
    "grad_norm": 1e-3,       # whole tensors: relative error of the L2 norm
    "grad_absmax": 1e-3,     # whole tensors: relative error of max |g|
    "params": 1e-4,          # after the update, stored elements: rel_err to max |param|
    "zero_grads": 1e-5,      # zero-gradient tensors: max |g| / the largest gradient
    "update_over_lr": 1.0,   # whole tensors: Adam's first step moves no element beyond lr
}
LR0 = 3e-4 / 25              # the OneCycle learning rate of step 0 (max lr / div_factor)


def step_errors(fx, case: str, got: dict) -> dict[str, float]:
    """The errors of histo_jax's step (or forward) ``got`` against the fixture ``fx`` (the
    PyTorch numbers of ``scripts/make_parity_reference.py``), bounded by ``TOLERANCES``."""
    k = f"{case}/"
    err = {"loss": abs(got["loss"] - float(fx[k + "loss"])),
           "logits": float(np.max(np.abs(got["logits"] - fx[k + "logits"])))}
    names = [str(s) for s in fx[k + "stat_names"]]
    ends = np.cumsum([got["stats"][s].size for s in names])
    ref_stats = np.split(fx[k + "stat_values"], ends[:-1])
    assert ends[-1] == fx[k + "stat_values"].size and len(names) == len(got["stats"])
    err["stats"] = max(rel_err(got["stats"][s], r) for s, r in zip(names, ref_stats))
    if "grads" not in got:
        return err
    names = [str(s) for s in fx[k + "param_names"]]
    zero = [str(s) for s in fx[k + "zero_grad_names"]]
    assert sorted(names + zero) == sorted(got["grads"]), "parameter names differ"
    counts = fx[k + "sample_count"]
    index = np.split(fx[k + "sample_index"], np.cumsum(counts)[:-1])
    ref_g = np.split(fx[k + "grad_samples"], np.cumsum(counts)[:-1])
    ref_p = np.split(fx[k + "param_samples"], np.cumsum(counts)[:-1])
    g_max, g_norm, p_max = fx[k + "grad_absmax"], fx[k + "grad_norm"], fx[k + "param_absmax"]
    e = {"grads": 0.0, "grad_norm": 0.0, "grad_absmax": 0.0, "params": 0.0}
    for i, name in enumerate(names):
        g, p = got["grads"][name].ravel(), got["params"][name].ravel()
        e["grads"] = max(e["grads"], float(np.max(np.abs(g[index[i]] - ref_g[i]))) / g_max[i])
        e["grad_norm"] = max(e["grad_norm"], abs(float(np.linalg.norm(g)) / g_norm[i] - 1))
        e["grad_absmax"] = max(e["grad_absmax"], abs(float(np.abs(g).max()) / g_max[i] - 1))
        e["params"] = max(e["params"], float(np.max(np.abs(p[index[i]] - ref_p[i]))) / p_max[i])
    err.update(e)
    err["zero_grads"] = max(float(np.abs(got["grads"][z]).max()) for z in zero) / g_max.max()
    # |new - initial| <= lr, up to float32 rounding of the parameter itself (values up to ~2).
    eps = float(np.finfo(np.float32).eps)
    err["update_over_lr"] = max(
        float(np.max(np.abs(got["params"][n] - p0) - 2 * eps * np.abs(p0)))
        for n, p0 in got["initial"].items()) / LR0
    return err


ZERO_GRAD_RATIO = 1e-5


def zero_grad_names(grad_absmax: dict[str, float]) -> set[str]:
    """Parameters whose gradient is zero in exact arithmetic: max |g| below ``ZERO_GRAD_RATIO``
    times the largest of all. They are the biases of the project BatchNorms (and of block 0's
    last BatchNorm): their output reaches the loss only through 1x1 convs followed by
    train-mode BatchNorm, which removes any per-channel shift. Both frameworks leave float
    noise there (here ~1e-8, against >= 1e-2 for every other tensor), and Adam turns that noise
    into updates of +-lr, so these are checked as zeros, not elementwise."""
    top = max(grad_absmax.values())
    return {k for k, v in grad_absmax.items() if v < ZERO_GRAD_RATIO * top}


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want|: the error relative to the tensor's scale."""
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))
