"""Pure, jit-compiled train and eval steps over a functional view of the NNX model.

The model is split once into a static graph (one per mode: train / eval) and two state
trees, ``params`` (``nnx.Param``) and ``batch_stats`` (``nnx.BatchStat``); the steps are
pure functions of ``(TrainState, batch, key)``. All randomness of step ``s`` (augmentation,
dropout, stochastic depth) comes from ``fold_in(key, s)``, so a resumed run replays the
same numbers.

:func:`jit_train_step` compiles the train step as one program (:func:`make_train_step`), or,
for a model whose trunk is 'staged' (the default in training on XLA:CPU), as
:class:`StagedTrainStep`: the same step as a chain of five compiled programs, whose
encoder forward and backward are compiled once and called once per input. It computes
the same numbers (a test holds the two equal) and compiles in the time of one input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from histo_jax import hostenv
from histo_jax.data import augment
from histo_jax.models import fusion
from histo_jax.stain.normalize import StainNormalizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelGraphs:
    """Static halves of the model in each mode; for a model with a staged train step
    (``train_trunk == 'staged'``), also its train-mode encoder's and its number of inputs."""

    train: Any
    eval: Any
    train_trunk: str = ""
    encoder: Any = None
    num_inputs: int = 0


def split_model(model: nnx.Module) -> tuple[ModelGraphs, Any, Any]:
    """Returns (graphs, params, batch_stats). Fails if the model holds other state (e.g. RNG keys)."""
    model.eval()
    graph_eval = nnx.graphdef(model)
    model.train()
    graph_train, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    trunk = (fusion.resolve_trunk(model.trunk, False, model.bn_stats)
             if isinstance(model, fusion.MultiInputClassifier) else "")
    encoder = nnx.graphdef(model.encoder) if trunk == "staged" else None
    return (ModelGraphs(graph_train, graph_eval, trunk, encoder,
                        getattr(model, "num_inputs", 0)), params, batch_stats)


# XLA:CPU's default scheduler keeps many activations of a train step alive at once; the
# memory-optimised one cuts the step's peak temp memory ~2.5x (EfficientNet-B0, 224 px).
CPU_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


def compiler_options(backend: str | None = None, *, memory_scheduler: bool = True) -> dict[str, str]:
    """XLA compiler options for the steps on ``backend`` (default: JAX's default backend).

    Pass them to ``jax.jit(..., compiler_options=...)``. Only XLA:CPU gets options: the
    memory-optimised scheduler (``memory_scheduler``; lower peak memory, a longer compile,
    the same numbers); other backends get ``{}``.
    """
    on_cpu = (backend or jax.default_backend()) == "cpu"
    return dict(CPU_COMPILER_OPTIONS) if on_cpu and memory_scheduler else {}


def init_train_state(params, batch_stats, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))


def weighted_cross_entropy(logits, labels, class_weights):
    """PyTorch ``CrossEntropyLoss(weight=w)``: sum_i w[y_i] nll_i / sum_i w[y_i]."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    w = class_weights[labels]
    return jnp.sum(w * nll) / jnp.sum(w)


def make_grad_fn(graphs: ModelGraphs, class_weights: jax.Array) -> Callable:
    """Builds ``grad_fn(params, batch_stats, images, labels, dropout_key) -> ((loss, logits,
    new_batch_stats), grads)``: the train-mode forward on preprocessed images, the weighted
    cross-entropy and its gradient with respect to ``params``."""

    def grad_fn(params, batch_stats, images, labels, dropout_key):
        def loss_fn(params):
            model = nnx.merge(graphs.train, params, batch_stats, copy=True)
            logits, _ = model(images, rngs=nnx.Rngs(dropout=dropout_key))
            loss = weighted_cross_entropy(logits, labels, class_weights)
            return loss, (logits, nnx.state(model, nnx.BatchStat))

        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return (loss, logits, new_stats), grads

    return grad_fn


def apply_gradients(tx: optax.GradientTransformation, state: TrainState, grads: Any,
                    batch_stats: Any) -> TrainState:
    """One optimizer step (the config's clipping, Adam, OneCycle) and the new batch stats."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                      batch_stats=batch_stats, opt_state=opt_state)


def normalize_stain(images: jax.Array, stain: StainNormalizer | None):
    """Stain normalisation of a batch (B, N, H, W, 3) -> (float images in [0, 1], number of
    images passed through unchanged); ``stain`` None leaves the images as they are."""
    if stain is None:
        return images, None
    out, ok = stain(jnp.asarray(images))
    return out.astype(jnp.float32), jnp.sum(~ok)


def make_train_step(graphs: ModelGraphs, tx: optax.GradientTransformation,
                    aug_cfg: "augment.AugmentConfig | None", normalization: str,
                    class_weights: jax.Array, stain: StainNormalizer | None = None) -> Callable:
    """Builds ``train_step(state, batch, key) -> (state, metrics)`` (not yet jitted): stain
    normalisation (``stain``), augmentation, preprocessing, :func:`make_grad_fn`'s
    gradient, :func:`apply_gradients`. With ``stain``, ``metrics['stain_passthrough']``
    counts the images too poor in tissue to normalise (passed through unchanged)."""
    grad_fn = make_grad_fn(graphs, class_weights)
    prepare = _make_prepare(aug_cfg, normalization, stain)

    def train_step(state: TrainState, batch: dict, key: jax.Array):
        images, dropout_key, passthrough = prepare(state.step, batch, key)
        labels = batch["labels"]
        (loss, logits, batch_stats), grads = grad_fn(state.params, state.batch_stats, images,
                                                     labels, dropout_key)
        return apply_gradients(tx, state, grads, batch_stats), _train_metrics(
            loss, logits, labels, grads, passthrough)

    return train_step


def _make_prepare(aug_cfg: "augment.AugmentConfig | None", normalization: str,
                  stain: StainNormalizer | None) -> Callable:
    """``prepare(step, batch, key) -> (images, dropout_key, passthrough)``: step ``step``'s
    keys (``fold_in(key, step)``), stain normalisation, augmentation, preprocessing."""

    def prepare(step, batch: dict, key: jax.Array):
        aug_key, dropout_key = jax.random.split(jax.random.fold_in(key, step))
        images, passthrough = normalize_stain(batch["images"], stain)
        if aug_cfg is not None:
            images = augment.augment_batch(aug_key, images, aug_cfg)
        return augment.preprocess(images, normalization), dropout_key, passthrough

    return prepare


def _train_metrics(loss, logits, labels, grads, passthrough) -> dict:
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        # Of the gradient as one vector (the one optax.flatten clips): one reduction, not
        # one per tensor (~300 fewer kernels for XLA:CPU to compile in the update program).
        "grad_norm": jnp.linalg.norm(jax.flatten_util.ravel_pytree(grads)[0]),
    }
    if passthrough is not None:
        metrics["stain_passthrough"] = passthrough
    return metrics


class StagedTrainStep:
    """:func:`make_train_step`'s step (same arguments, same numbers) for a model whose
    trunk is 'staged', run as a chain of compiled programs:

    1. ``prepare``: keys, stain normalisation, augmentation, preprocessing; the N inputs'
       encoder keys (``fusion.input_keys``, as the model draws them);
    2. ``forward`` per input, input 0 first: the train-mode encoder on its B crops, its new
       BatchNorm statistics (passed on to the next input, so the running averages take one
       update per input, in order) and its backward's residuals (``jax.vjp``);
    3. ``head``: :meth:`MultiInputClassifier.fuse`, the weighted cross-entropy, and its
       gradient with respect to every parameter and to the N inputs' features;
    4. ``backward`` per input: the encoder's parameter gradient, added to the sum
       (1 to 4 are :meth:`value_and_grad`);
    5. ``update``: :func:`apply_gradients` and the metrics.

    The encoder is compiled once whatever N (its programs are called N times), so a step
    compiles in the time of a one-input step (N = 4, EfficientNet-B0: 24 s against 73 s
    for one program on a 2-core Xeon); XLA:CPU's step time is the same. Each program is
    compiled on its first call (:class:`hostenv.CompiledOnFirstCall`), or ahead with
    :meth:`compile`. ``out_sharding``: the state's sharding (replicated) under a mesh.
    """

    def __init__(self, graphs: ModelGraphs, tx: optax.GradientTransformation,
                 aug_cfg: "augment.AugmentConfig | None", normalization: str,
                 class_weights: jax.Array, stain: StainNormalizer | None = None, *,
                 out_sharding: Any = None, compiler_options: dict | None = None):
        if graphs.encoder is None:
            raise ValueError("StagedTrainStep needs a MultiInputClassifier whose training trunk "
                             f"is 'staged' (config field model.trunk), got {graphs.train_trunk!r}.")
        n, enc_graph = graphs.num_inputs, graphs.encoder
        prepare_images = _make_prepare(aug_cfg, normalization, stain)

        def prepare(step, batch, key):
            images, dropout_key, passthrough = prepare_images(step, batch, key)
            keys = fusion.input_keys(nnx.Rngs(dropout=dropout_key), n)
            return (tuple(images[:, i] for i in range(n)), tuple(keys), dropout_key,
                    passthrough)

        def forward(params, stats, x, key):
            def encode(params):
                encoder = nnx.merge(enc_graph, params, stats, copy=True)
                return encoder(x, nnx.Rngs(dropout=key)), nnx.state(encoder, nnx.BatchStat)
            feats, backward, stats = jax.vjp(encode, params, has_aux=True)
            return feats, stats, backward

        def head(params, batch_stats, feats, labels, dropout_key):
            def loss_fn(params, feats):
                model = nnx.merge(graphs.train, params, batch_stats, copy=True)
                rngs = nnx.Rngs(dropout=dropout_key)
                fusion.input_keys(rngs, n)  # the encoder's draw; the head's keys come after
                logits, _ = model.fuse(jnp.stack(feats, axis=1), rngs)
                return weighted_cross_entropy(logits, labels, class_weights), logits
            (loss, logits), (grads, dfeats) = jax.value_and_grad(
                loss_fn, argnums=(0, 1), has_aux=True)(params, feats)
            return loss, logits, grads, dfeats

        def backward(vjp, dfeats, acc):
            (grads,) = vjp(dfeats)
            return jax.tree.map(jnp.add, acc, grads)

        def update(state, grads, batch_stats, loss, logits, labels, passthrough):
            return apply_gradients(tx, state, grads, batch_stats), _train_metrics(
                loss, logits, labels, grads, passthrough)

        kw = dict(compiler_options=compiler_options or None)
        jit = lambda f, **k: hostenv.CompiledOnFirstCall(jax.jit(f, **k, **kw))  # noqa: E731
        self.num_inputs = n
        self.prepare, self.forward, self.head = jit(prepare), jit(forward), jit(head)
        self.backward = jit(backward, donate_argnums=2)
        self.update = jit(update, donate_argnums=0, **(
            {} if out_sharding is None else {"out_shardings": (out_sharding, out_sharding)}))

    def __call__(self, state: TrainState, batch: dict, key: jax.Array):
        loss, logits, batch_stats, grads, passthrough = self.value_and_grad(state, batch, key)
        return self.update(state, grads, batch_stats, loss, logits, batch["labels"],
                           passthrough)

    def value_and_grad(self, state: TrainState, batch: dict, key: jax.Array):
        """Steps 1 to 4: ``(loss, logits, new batch_stats, grads, stain passthrough)``, the
        values :func:`make_grad_fn` and :func:`make_train_step` compute."""
        xs, keys, dropout_key, passthrough = self.prepare(state.step, batch, key)
        params, stats = state.params["encoder"], state.batch_stats["encoder"]
        feats, vjps = [], []
        for x, k in zip(xs, keys):
            f, stats, vjp = self.forward(params, stats, x, k)
            feats.append(f)
            vjps.append(vjp)
        del xs
        loss, logits, grads, dfeats = self.head(state.params, state.batch_stats, tuple(feats),
                                                batch["labels"], dropout_key)
        acc = grads["encoder"]  # zeros: the head does not use the encoder
        grads = _without_encoder(grads)
        for i in reversed(range(self.num_inputs)):
            acc = self.backward(vjps.pop(), dfeats[i], acc)  # each residual freed when used
        return (loss, logits, _with_encoder(_without_encoder(state.batch_stats), stats),
                _with_encoder(grads, acc), passthrough)

    def compile(self, state: TrainState, batch: dict, key: jax.Array) -> None:
        """Compiles every program ahead of the first step, for these arguments (arrays or
        ``jax.ShapeDtypeStruct``); the step then runs without compiling."""
        xs, keys, dropout_key, passthrough = self.prepare.compile(
            state.step, batch, key).out_info
        params, stats = state.params["encoder"], state.batch_stats["encoder"]
        feats, stats, vjp = self.forward.compile(params, stats, xs[0], keys[0]).out_info
        loss, logits, grads, dfeats = self.head.compile(
            state.params, state.batch_stats, (feats,) * self.num_inputs, batch["labels"],
            dropout_key).out_info
        acc = self.backward.compile(vjp, dfeats[0], grads["encoder"]).out_info
        self.update.compile(state, _with_encoder(_without_encoder(grads), acc),
                            _with_encoder(_without_encoder(state.batch_stats), stats), loss,
                            logits, batch["labels"], passthrough)


def _without_encoder(tree: nnx.State) -> nnx.State:
    return nnx.State({k: tree[k] for k in tree if k != "encoder"})


def _with_encoder(rest: nnx.State, encoder: nnx.State) -> nnx.State:
    return nnx.merge_state(rest, nnx.State({"encoder": encoder}))


def jit_train_step(graphs: ModelGraphs, tx: optax.GradientTransformation,
                   aug_cfg: "augment.AugmentConfig | None", normalization: str,
                   class_weights: jax.Array, stain: StainNormalizer | None = None, *,
                   mesh: Any = None, compiler_options: dict | None = None,
                   staged: bool | None = None) -> Callable:
    """The compiled train step ``step(state, batch, key) -> (state, metrics)`` of
    :func:`make_train_step`: a :class:`StagedTrainStep` for a model whose training trunk
    is 'staged' (``staged`` None; False: one program whatever the trunk), otherwise one
    program. Under ``mesh``: the state replicated, the batch sharded on 'data'; the state
    argument is donated. Both compile on their first call (again for new shapes), or ahead
    with ``step.compile(state, batch, key)``."""
    repl = None if mesh is None else NamedSharding(mesh, P())
    if graphs.train_trunk == "staged" if staged is None else staged:
        return StagedTrainStep(graphs, tx, aug_cfg, normalization, class_weights, stain,
                               out_sharding=repl, compiler_options=compiler_options)
    shard = {} if mesh is None else dict(
        in_shardings=(repl, NamedSharding(mesh, P("data")), repl), out_shardings=(repl, repl))
    return hostenv.CompiledOnFirstCall(jax.jit(
        make_train_step(graphs, tx, aug_cfg, normalization, class_weights, stain),
        donate_argnums=0, compiler_options=compiler_options or None, **shard))


def make_eval_step(graphs: ModelGraphs, normalization: str,
                   stain: StainNormalizer | None = None) -> Callable:
    """Builds ``eval_step(params, batch_stats, images) -> (logits, attention)``: stain
    normalisation (``stain``, as in training), preprocessing, the eval-mode forward."""

    def eval_step(params, batch_stats, images):
        model = nnx.merge(graphs.eval, params, batch_stats, copy=True)
        images, _ = normalize_stain(images, stain)
        logits, attention = model(augment.preprocess(images, normalization))
        return logits.astype(jnp.float32), attention.astype(jnp.float32)

    return eval_step
