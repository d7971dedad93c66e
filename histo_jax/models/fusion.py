"""Multi-input classifier: shared EfficientNet encoder + per-input cross-attention fusion.

Reimplements the reference ``MultiInputModule`` (docs/reference.md §3) with PyTorch semantics:

* the encoder runs ONCE over all B * N crops (inputs folded into the batch axis, b-major;
  ``trunk='folded'``), or once per input over its B crops, as the original calls it:
  inside one ``lax.scan`` (``trunk='scan'``: one compiled trunk) or unrolled
  (``trunk='unrolled'``: N compiled trunks). ``trunk='staged'`` is 'unrolled' when the
  model is called, and tells the train step to run as a chain of compiled programs
  (:class:`histo_jax.steps.StagedTrainStep`: :meth:`MultiInputClassifier.fuse` after the
  encoder called per input). ``trunk='auto'`` (the default; see ``resolve_trunk``) is
  staged in training on XLA:CPU (folded elsewhere) and scan in eval mode, the fastest and
  the leanest on XLA:CPU (benchmarks/README.md). Every per-input call gives input i's
  encoder the key ``input_keys(rngs, N)[i]``, so all of them draw the same random numbers. In training its
  BatchNorms normalise each input with that input's own statistics and update their
  running averages once per input, input 0 first (``bn_stats='per_input'``, the
  reference), or pool all crops (``bn_stats='joint'``, a deviation; folded only). In eval
  mode each call may take fewer crops (``eval_chunk``, see ``eval_chunk_size``; crops are
  independent there). All trunk calls give the same numbers (a test holds them equal);
* a shared Linear(F -> E) projects each pooled feature to a token;
* for each input i its own ``nn.MultiheadAttention`` (query = token i, keys = values = all
  tokens, dropout on the attention weights), then the shared
  ``LayerNorm1(attended + token_i)`` and ``LayerNorm2(x + FFN(x))``;
* concatenation in input order -> Dropout -> Linear(E*N -> E) -> ReLU -> Dropout -> Linear(E -> C).

``model(images, rngs=None) -> (logits, attention)`` with images (B, N, H, W, 3) float32,
logits (B, C) float32 and attention (B, N, N) float32 (row i: input i's weights over all
inputs, averaged over heads; like PyTorch, in train mode these are the weights after dropout).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from histo_jax.models import layers
from histo_jax.models.config import BN_STATS, TRUNKS
from histo_jax.models.efficientnet import EfficientNet, _check_images


def _torch_linear(din: int, dout: int, *, dtype: Any, rngs: nnx.Rngs,
                  zero_bias: bool = False) -> nnx.Linear:
    """nnx.Linear initialised like PyTorch ``nn.Linear`` (uniform +-1/sqrt(fan_in))."""
    init = layers.torch_linear_init(din)
    return nnx.Linear(din, dout, dtype=dtype, param_dtype=jnp.float32, kernel_init=init,
                      bias_init=jax.nn.initializers.zeros if zero_bias else init, rngs=rngs)


class TorchMultiheadAttention(nnx.Module):
    """``torch.nn.MultiheadAttention`` (packed q, k, v in_proj; batch first; no masks)."""

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads} "
                             "(histo_jax/models/fusion.py); change model.embed_dim or "
                             "model.num_heads.")
        # in_proj kernel (E, 3E) = PyTorch in_proj_weight (3E, E) transposed; xavier uniform.
        self.in_proj = nnx.Linear(embed_dim, 3 * embed_dim, dtype=dtype, param_dtype=jnp.float32,
                                  kernel_init=layers.glorot_init,
                                  bias_init=jax.nn.initializers.zeros, rngs=rngs)
        self.out_proj = _torch_linear(embed_dim, embed_dim, dtype=dtype, rngs=rngs,
                                      zero_bias=True)
        self.num_heads = num_heads
        self.dropout = dropout
        self.deterministic = False

    @property
    def drops(self) -> bool:
        """Whether the attention weights get dropout (train mode, rate > 0)."""
        return not self.deterministic and self.dropout > 0.0

    def __call__(self, query: jax.Array, kv: jax.Array,
                 dropout_u: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """query (B, Lq, E), kv (B, L, E) -> output (B, Lq, E), head-averaged weights (B, Lq, L).

        ``dropout_u``: uniforms in [0, 1) of shape (B, num_heads, Lq, L), the dropout draw
        of the attention weights (when :attr:`drops`)."""
        e = query.shape[-1]
        h, hd = self.num_heads, e // self.num_heads
        w = self.in_proj.kernel[...].astype(self.in_proj.dtype)
        b = self.in_proj.bias[...].astype(self.in_proj.dtype)
        q = query.astype(w.dtype) @ w[:, :e] + b[:e]
        k = kv.astype(w.dtype) @ w[:, e:2 * e] + b[e:2 * e]
        v = kv.astype(w.dtype) @ w[:, 2 * e:] + b[2 * e:]

        def heads(t):  # (B, L, E) -> (B, h, L, hd)
            return t.reshape(t.shape[0], t.shape[1], h, hd).transpose(0, 2, 1, 3)

        q, k, v = heads(q), heads(k), heads(v)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype), k)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        if self.drops:
            weights = layers.dropout(weights, self.dropout, layers.require_draw(
                dropout_u, "TorchMultiheadAttention", "(B, num_heads, Lq, L)"))
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v)
        out = out.transpose(0, 2, 1, 3).reshape(query.shape[0], query.shape[1], e)
        return self.out_proj(out), jnp.mean(weights, axis=1)


def resolve_trunk(trunk: str, deterministic: bool, bn_stats: str,
                  backend: str | None = None) -> str:
    """The trunk call ``trunk='auto'`` stands for (others are returned as they are).

    Eval mode: 'scan' (one trunk, ``eval_chunk_size`` crops per call: the fastest and the
    lowest peak memory on XLA:CPU).
    Training on XLA:CPU: 'staged' (B crops per call stay cache-sized: the N = 4 train step
    takes 0.75x folded's time on a 2-core Xeon, as 'unrolled' does, and compiles in the time
    of one input: 24 s against unrolled's 73 s); elsewhere, and always with
    ``bn_stats='joint'``, 'folded' (one large batch).
    """
    if trunk != "auto":
        return trunk
    if deterministic:
        return "scan"
    if bn_stats != "per_input":
        return "folded"
    return "staged" if (backend or jax.default_backend()) == "cpu" else "folded"


def input_keys(rngs: nnx.Rngs | None, n: int) -> jax.Array | None:
    """The keys of the N per-input encoder calls (one draw from ``rngs``, split N ways;
    None without ``rngs``). Every per-input trunk uses them, so that scan, unrolled and
    staged draw the same dropout and stochastic-depth masks, and the fusion head's draws
    come after."""
    return None if rngs is None else jax.random.split(
        layers.next_key(rngs, "MultiInputClassifier"), n)


def _key_rngs(keys: jax.Array | None, i: int) -> nnx.Rngs | None:
    return None if keys is None else nnx.Rngs(dropout=keys[i])


def eval_chunk_size(batch: int, eval_chunk: int, backend: str | None = None) -> int:
    """Crops per encoder call in eval mode for a batch of ``batch`` crops per input.

    ``eval_chunk`` > 0: that many (at most ``batch``); 0: the whole batch; -1 ('auto'): on
    XLA:CPU, for batches over 16, the size in 4..16 that pads the batch least, nearest 8
    (e.g. 25 -> 5, 32 -> 8, 17 -> 9), so that a call's activations stay cache-sized (N = 1
    eval 10 % faster and 37 % less temp memory than 25 crops per call on a 2-core Xeon:
    benchmarks/README.md); the whole batch on other backends.
    """
    if eval_chunk > 0:
        return min(int(eval_chunk), batch)
    if eval_chunk == 0 or batch <= 16 or (backend or jax.default_backend()) != "cpu":
        return batch
    return min(range(4, 17), key=lambda c: (-(-batch // c) * c, abs(c - 8)))


class MultiInputClassifier(nnx.Module):
    """Shared encoder + per-input cross-attention fusion + MLP classifier for N in 1..4 inputs."""

    def __init__(self, num_inputs: int, *, encoder: EfficientNet, embed_dim: int = 128,
                 num_heads: int = 8, ffn_dim: int = 512, dropout: float = 0.5,
                 attn_dropout: float = 0.5, num_classes: int = 2, ln_eps: float = 1e-5,
                 bn_stats: str = "per_input", trunk: str = "auto", eval_chunk: int = -1,
                 dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if num_inputs < 1:
            raise ValueError(f"num_inputs must be >= 1, got {num_inputs}.")
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats {bn_stats!r} is unknown (config field model.bn_stats); "
                             f"use one of {BN_STATS}.")
        if trunk not in TRUNKS:
            raise ValueError(f"trunk {trunk!r} is unknown (config field model.trunk); "
                             f"use one of {TRUNKS}.")
        if trunk in ("scan", "unrolled", "staged") and bn_stats != "per_input":
            raise ValueError(f"model.trunk='{trunk}' calls the encoder once per input, so its "
                             "statistics are per input: it needs model.bn_stats='per_input' "
                             "(or use model.trunk='folded' or 'auto' with bn_stats='joint').")
        if int(eval_chunk) < -1:
            raise ValueError(f"eval_chunk must be -1 (auto), 0 (the whole batch) or a number of "
                             f"crops > 0 (config field model.eval_chunk), got {eval_chunk}.")
        self.num_inputs = num_inputs
        self.bn_stats = bn_stats
        self.trunk = trunk
        self.eval_chunk = int(eval_chunk)
        self.encoder = encoder
        self.dtype = jnp.dtype(dtype)
        self.proj = _torch_linear(encoder.num_features, embed_dim, dtype=dtype, rngs=rngs)
        self.attention = nnx.List([
            TorchMultiheadAttention(embed_dim, num_heads, dropout=attn_dropout, dtype=dtype,
                                    rngs=rngs) for _ in range(num_inputs)])
        self.norm1 = nnx.LayerNorm(embed_dim, epsilon=ln_eps, use_fast_variance=False,
                                   dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.norm2 = nnx.LayerNorm(embed_dim, epsilon=ln_eps, use_fast_variance=False,
                                   dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.ffn1 = _torch_linear(embed_dim, ffn_dim, dtype=dtype, rngs=rngs)
        self.ffn2 = _torch_linear(ffn_dim, embed_dim, dtype=dtype, rngs=rngs)
        self.fc1 = _torch_linear(embed_dim * num_inputs, embed_dim, dtype=dtype, rngs=rngs)
        self.fc2 = _torch_linear(embed_dim, num_classes, dtype=dtype, rngs=rngs)
        self.dropout = dropout
        self.deterministic = False

    def _drop(self, x: jax.Array, u: jax.Array | None) -> jax.Array:
        return x if u is None else layers.dropout(x, self.dropout, u)

    def __call__(self, images: jax.Array,
                 rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """images (B, N, H, W, 3) -> logits (B, C) float32, attention (B, N, N) float32."""
        _check_images(images, 5, "MultiInputClassifier")
        b, n = images.shape[:2]
        if n != self.num_inputs:
            raise ValueError(f"MultiInputClassifier was built for {self.num_inputs} inputs but "
                             f"got images with N = {n} (shape {tuple(images.shape)}).")
        layers.check_rngs(self, rngs, "MultiInputClassifier")
        trunk = resolve_trunk(self.trunk, self.deterministic, self.bn_stats)
        if trunk == "scan" and self.deterministic:
            feats = self._encode_in_chunks(images)                                 # (B*N, F)
        elif trunk == "scan" and n > 1:
            feats = self._encode_each_input(images, rngs)                          # (B*N, F)
        elif trunk != "folded":  # unrolled, staged, and scan of one input
            keys = input_keys(rngs, n)
            feats = jnp.stack([self.encoder(images[:, i], _key_rngs(keys, i))
                               for i in range(n)], axis=1).reshape(b * n, -1)    # (B*N, F)
        else:
            groups = n if self.bn_stats == "per_input" else 1
            feats = self.encoder(images.reshape((b * n,) + images.shape[2:]), rngs,
                                 stat_groups=groups)                              # (B*N, F)
        return self.fuse(feats.reshape(b, n, -1), rngs)

    def fuse(self, feats: jax.Array,
             rngs: nnx.Rngs | None = None) -> tuple[jax.Array, jax.Array]:
        """The part after the encoder: pooled features (B, N, F) -> logits (B, C) float32,
        attention (B, N, N) float32. In train mode all its dropout masks come from one key
        of ``rngs``, drawn after the encoder's (:func:`layers.uniform_draws`)."""
        u = layers.uniform_draws(rngs, self._dropout_shapes(*feats.shape[:2]),
                                 "MultiInputClassifier")
        tokens = self.proj(feats.astype(self.dtype))                             # (B, N, E)
        fused, attn = [], []
        for i, mha in enumerate(self.attention):
            q = tokens[:, i:i + 1]
            attended, w = mha(q, tokens, u.get(f"attention{i}"))
            x = self.norm1(attended + q)
            ffn = self.ffn2(self._drop(jax.nn.relu(self.ffn1(x)), u.get(f"ffn{i}")))
            x = self.norm2(x + ffn)
            fused.append(x[:, 0])
            attn.append(w[:, 0])
        z = jnp.concatenate(fused, axis=-1)
        z = jax.nn.relu(self.fc1(self._drop(z, u.get("fc1"))))
        logits = self.fc2(self._drop(z, u.get("fc2")))
        return logits.astype(jnp.float32), jnp.stack(attn, axis=1).astype(jnp.float32)

    def _dropout_shapes(self, b: int, n: int) -> dict[str, tuple[int, ...]]:
        """The shapes of the head's dropout draws, in draw order (none in eval mode)."""
        shapes, drops = {}, not self.deterministic and self.dropout > 0.0
        e = self.fc1.out_features
        for i, mha in enumerate(self.attention):
            if mha.drops:
                shapes[f"attention{i}"] = (b, mha.num_heads, 1, n)
            if drops:
                shapes[f"ffn{i}"] = (b, 1, self.ffn1.out_features)
        if drops:
            shapes["fc1"], shapes["fc2"] = (b, e * n), (b, e)
        return shapes

    def _encode_in_chunks(self, images: jax.Array) -> jax.Array:
        """Eval mode: the encoder in a ``lax.scan`` over chunks of ``eval_chunk_size`` crops,
        input 0 first (the batch zero-padded to a multiple of the chunk, the padding's
        features dropped). Crops are independent in eval mode, so any chunking gives the
        same numbers."""
        b, n = images.shape[:2]
        graphdef, params, rest = nnx.split(self.encoder, nnx.Param, ...)
        c = eval_chunk_size(b, self.eval_chunk)
        bp = -(-b // c) * c
        xs = jnp.moveaxis(images, 1, 0)                                         # (N, B, ...)
        if bp > b:
            xs = jnp.pad(xs, ((0, 0), (0, bp - b)) + ((0, 0),) * (xs.ndim - 2))
        xs = xs.reshape((n * bp // c, c) + xs.shape[2:])
        _, feats = jax.lax.scan(
            lambda carry, x: (carry, nnx.merge(graphdef, params, rest)(x)), None, xs)
        return jnp.moveaxis(feats.reshape(n, bp, -1)[:, :b], 0, 1).reshape(b * n, -1)

    def _encode_each_input(self, images: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
        """Training: the encoder called once per input (B crops each), input 0 first, in a
        ``lax.scan``: one compiled trunk, whatever N. The BatchNorm statistics (the scan's
        carry) take one update per input, in order; the parameters are shared constants of
        the loop."""
        b, n = images.shape[:2]
        graphdef, params, rest = nnx.split(self.encoder, nnx.Param, ...)
        keys = input_keys(rngs, n)

        def one_input(rest, inputs):
            x, key = inputs
            encoder = nnx.merge(graphdef, params, rest)
            feats = encoder(x, None if key is None else nnx.Rngs(dropout=key))
            return nnx.state(encoder, nnx.Not(nnx.Param)), feats

        rest, feats = jax.lax.scan(one_input, rest, (jnp.moveaxis(images, 1, 0), keys))
        nnx.update(self.encoder, rest)
        return jnp.moveaxis(feats, 0, 1).reshape(b * n, -1)                      # b-major
