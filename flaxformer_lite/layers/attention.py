"""`MultiHeadAttention`: query/key/value/out projections around a softmax or linear attention kernel, with
rotary positions and decode caches.

Shape key: b batch, q query length, k key length, e embed dim, h query heads, n kv heads, d head dim.
Parameters carry logical axis names (``embed``, ``heads``, ``kv_heads``, ``head_dim``) for sharding rules.

Decoding (``decode="prefill"`` then ``decode="step"``, with the ``cache`` collection mutable) follows Flax's idiom:
``model.init(..., decode=...)`` on a full-length input creates the cache variables (their shapes come from that
input), later calls fill them. Softmax self-attention keeps a preallocated key/value cache written at
``cache_index``; linear self-attention keeps its recurrent state (prefill sums the prompt, a step adds one token);
cross-attention projects the encoder output once, at prefill, and reuses it.

With the ``intermediates`` collection mutable, every attention except linear sows its weights ``[b, h, q, k]`` as
``attention_weights`` (computed densely, only then): what attention-map pictures read.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..attention import (FEATURE_MAPS, IMPLS, FeatureMap, Mask, attend_scores, attention_weights, delta_attention,
                         delta_init_state, delta_step, linear_attention, linear_init_state, linear_prefill_state,
                         linear_step, softmax_attention)
from .attention_scores import (AdditiveScores, DenseSynthesizerScores, RandomSynthesizerScores, TalkingHeads,
                               dot_scores)
from .dense import general_kernel_init, kernel_dot_general
from ..choices import ATTENTION_KINDS, RECURRENT_GATES, RopeScaling
from .embeddings import rotary

SYNTHESIZERS = ("synthesizer_dense", "synthesizer_random")  # logits from positions/tokens alone: no queries, no keys
DECODE_MODES = (None, "prefill", "step")
RECURRENT = ("linear", "delta")  # attention kinds that decode from a recurrent state, not a KV cache
default_kernel_init = nn.initializers.normal(stddev=0.02)


def _with_bias(scores: jax.Array, bias: jax.Array | None) -> jax.Array:
    """float32 logits ``[b, h, q, k]`` plus an optional additive bias broadcastable to them."""
    return scores if bias is None else scores + bias.astype(jnp.float32)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with GQA/MQA, a free head dim, and the kernel chosen by configuration.

    Attributes:
      num_heads: query heads h.
      num_kv_heads: key/value heads n (``h % n == 0``); None means ``h`` (MHA); 1 is MQA.
      head_dim: d; None means ``embed_dim // num_heads``. It may differ from that (a wider head removes the
        low-rank bottleneck of small heads, Bhojanapalli et al. 2020).
      out_dim: output features; None means the query input's feature size.
      attention: ``"softmax"``, ``"linear"``, ``"delta"`` (the delta rule, DeltaNet: causal self-attention only; a
        ``beta`` Dense ``[embed, n]`` gives each token's writing strength through a sigmoid), or one of the dense
        variants (layers/attention_scores.py):
        ``"additive"`` (Bahdanau), ``"synthesizer_dense"``, ``"synthesizer_random"`` (Tay et al.; self-attention
        only, at most ``max_len`` keys).
      attention_impl: softmax impl (``"auto"``, ``"reference"``, ``"xla"``, ``"blockwise"``, ``"cudnn"``); the dense
        variants and talking-heads always compute dense logits.
      talking_heads: mix the logits and the probabilities across heads (Shazeer et al. 2020); softmax only.
      max_len: the longest key axis of the Synthesizer tables.
      feature_map: linear-attention feature map (``"elu"``, ``"relu"``, ``"favor"`` or a `FeatureMap`).
      recurrent_gate: decay of linear or delta self-attention's state (causal masks only): ``"none"``; ``"fixed"``, RetNet's
        ``1 - 2^(-5 - i)`` for kv head i (no parameters); ``"data"``, a per-token decay per kv head,
        ``log_sigmoid(x W + b) / 16`` as in GLA (parameters ``gate``: ``[embed, n]`` and ``[n]``).
      dropout_rate: attention-probability dropout (not linear), active when ``deterministic=False``.
      rope_base: if set, rotary position embedding (base e.g. 10000) on self-attention queries and keys;
        rope_scaling: its `RopeScaling` (long-context frequency stretch), or None.
      use_bias: biases on the four projections; qkv_bias: on the query/key/value projections only when it differs
        (None: as ``use_bias``; Qwen2 has them without an output bias).
      qk_norm: RMSNorm over each head's ``d`` features of the queries and keys (``query_norm``, ``key_norm``, one
        ``[d]`` scale each), before rotary (Qwen3, OLMo 2-style); norm_epsilon: its epsilon.
      dtype: compute dtype; param_dtype: parameter dtype.
      kernel_init: initialiser of the projection kernels.
    """

    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    out_dim: int | None = None
    attention: str = "softmax"
    attention_impl: str = "auto"
    feature_map: "str | FeatureMap" = "elu"
    recurrent_gate: str = "none"
    talking_heads: bool = False
    max_len: int | None = None
    dropout_rate: float = 0.0
    rope_base: float | None = None
    rope_scaling: RopeScaling | None = None
    use_bias: bool = True
    qkv_bias: bool | None = None
    qk_norm: bool = False
    norm_epsilon: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = default_kernel_init

    def _check(self, embed_dim: int) -> tuple[int, int]:
        kv_heads = self.num_kv_heads or self.num_heads
        if self.num_heads < 1 or self.num_heads % kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a positive multiple of num_kv_heads ({kv_heads})")
        if self.head_dim is None and embed_dim % self.num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) is not divisible by num_heads ({self.num_heads}); "
                             "set head_dim explicitly")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention == "softmax" and self.attention_impl not in IMPLS:
            raise ValueError(f"attention_impl must be one of {IMPLS}, got {self.attention_impl!r}")
        if self.attention == "linear" and isinstance(self.feature_map, str) and self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)}, got {self.feature_map!r}")
        if self.recurrent_gate not in RECURRENT_GATES:
            raise ValueError(f"recurrent_gate must be one of {RECURRENT_GATES}, got {self.recurrent_gate!r}")
        if self.recurrent_gate != "none" and self.attention not in RECURRENT:
            raise ValueError(f"recurrent_gate={self.recurrent_gate!r} needs attention 'linear' or 'delta', got "
                             f"{self.attention!r}")
        if self.attention in RECURRENT and self.dropout_rate:
            raise ValueError(f"dropout_rate must be 0 with attention={self.attention!r} (no attention probabilities "
                             "to drop)")
        if self.talking_heads and self.attention != "softmax":
            raise ValueError(f"talking_heads needs attention='softmax', got {self.attention!r}")
        if self.attention in SYNTHESIZERS and not self.max_len:
            raise ValueError(f"attention={self.attention!r} needs max_len (the size of its position tables)")
        if self.qk_norm and self.attention in SYNTHESIZERS:
            raise ValueError(f"qk_norm needs queries and keys; attention={self.attention!r} has none")
        return kv_heads, self.head_dim or embed_dim // self.num_heads

    def _project(self, name: str, x: jax.Array, heads: int, head_dim: int, head_axis: str) -> jax.Array:
        y = nn.DenseGeneral(
            (heads, head_dim), use_bias=self.use_bias if self.qkv_bias is None else self.qkv_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, dot_general=kernel_dot_general,
            kernel_init=general_kernel_init(self.kernel_init, ("embed", head_axis, "head_dim")),
            bias_init=general_kernel_init(nn.initializers.zeros, (head_axis, "head_dim")), name=name)(x)
        y = nn.with_logical_constraint(y, ("batch", "length", head_axis, "head_dim"))
        if self.qk_norm and name in ("query", "key"):
            y = nn.RMSNorm(epsilon=self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                           scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)),
                           name=f"{name}_norm")(y)
        return y

    @nn.compact
    def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *, mask: Mask | None = None,
                 bias: jax.Array | None = None, positions: jax.Array | None = None, deterministic: bool = True,
                 decode: str | None = None, cache_index: jax.Array | None = None) -> jax.Array:
        """Attend from ``inputs_q [b, q, e]`` to ``inputs_kv [b, k, e]`` (itself when None) -> ``[b, q, out_dim]``.

        Args:
          mask: a `Mask`. When decoding self-attention, a causal mask with ``q_offset = cache_index``.
          bias: additive logits bias broadcastable to ``[b, h, q, k]`` (softmax only).
          positions: int ``[b, q]`` positions for rotary embedding (default ``0..q-1``).
          deterministic: False enables attention dropout (needs a ``dropout`` rng).
          decode: None, ``"prefill"`` (fill an empty cache from a prompt) or ``"step"`` (extend it).
          cache_index: int scalar, where this call's tokens go in the self-attention cache.
        """
        if inputs_q.ndim != 3 or (inputs_kv is not None and inputs_kv.ndim != 3):
            raise ValueError(f"inputs must be [batch, length, features]; got {inputs_q.shape} and "
                             f"{None if inputs_kv is None else inputs_kv.shape}")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        kv_heads, head_dim = self._check(inputs_q.shape[-1])
        cross = inputs_kv is not None
        if cross and self.attention in SYNTHESIZERS:
            raise ValueError(f"attention={self.attention!r} is self-attention only (its logits ignore the keys)")
        if cross and (self.recurrent_gate != "none" or self.attention == "delta"):
            raise ValueError(f"attention={self.attention!r} with recurrent_gate={self.recurrent_gate!r} is for causal "
                             "self-attention, not cross-attention")
        keyless = self.attention in SYNTHESIZERS
        q = None if keyless else self._project("query", inputs_q, self.num_heads, head_dim, "heads")
        if cross:
            k, v = self._cross_kv(inputs_kv, kv_heads, head_dim, decode)
        else:
            k = None if keyless else self._project("key", inputs_q, kv_heads, head_dim, "kv_heads")
            v = self._project("value", inputs_q, kv_heads, head_dim, "kv_heads")
            if self.rope_base is not None and not keyless:
                if positions is None:
                    positions = jnp.broadcast_to(jnp.arange(inputs_q.shape[1]), inputs_q.shape[:2])
                q = rotary(q, positions, self.rope_base, self.rope_scaling)
                k = rotary(k, positions, self.rope_base, self.rope_scaling)
        gate = self._recurrent_gate(inputs_q, kv_heads) if self.recurrent_gate != "none" else {}
        if self.attention == "delta":
            gate["beta"] = self._delta_beta(inputs_q, kv_heads)
        if decode and not cross and self.attention in RECURRENT:
            out = self._recurrent_decode(q, k, v, mask, decode, gate)
        else:
            if decode and not cross:
                k, v = self._softmax_cache(k, v, cache_index)
            out = self._attend(q, k, v, mask, bias, deterministic, inputs_q, positions, gate)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
        return nn.DenseGeneral(
            self.out_dim or inputs_q.shape[-1], axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
            param_dtype=self.param_dtype, dot_general=kernel_dot_general,
            kernel_init=general_kernel_init(self.kernel_init, ("heads", "head_dim", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), name="out")(out)

    def _recurrent_gate(self, inputs_q: jax.Array, kv_heads: int) -> dict:
        """``{"decay": [n]}`` (fixed) or ``{"log_decay": [b, l, n]}`` (data) for `linear_attention`."""
        if self.recurrent_gate == "fixed":  # RetNet (Sun et al. 2023): gamma_i = 1 - 2^(-5 - i)
            return {"decay": 1.0 - 2.0 ** (-5.0 - np.arange(kv_heads, dtype=np.float32))}
        logits = nn.Dense(kv_heads, dtype=jnp.float32, param_dtype=self.param_dtype,
                          kernel_init=nn.with_logical_partitioning(self.kernel_init, ("embed", "kv_heads")),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads",)),
                          name="gate")(inputs_q)
        return {"log_decay": jax.nn.log_sigmoid(logits) / 16.0}  # GLA's gate_logit_normalizer (Yang et al. 2024)

    def _delta_beta(self, inputs_q: jax.Array, kv_heads: int) -> jax.Array:
        """DeltaNet's writing strength ``sigmoid(x W + b)`` ``[b, l, n]`` float32 (parameters ``beta``)."""
        return jax.nn.sigmoid(nn.Dense(kv_heads, dtype=jnp.float32, param_dtype=self.param_dtype,
                                       kernel_init=nn.with_logical_partitioning(self.kernel_init, ("embed", "kv_heads")),
                                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads",)),
                                       name="beta")(inputs_q))

    def _attend(self, q, k, v, mask, bias, deterministic, inputs_q, positions, gate):
        if self.attention == "linear":
            return linear_attention(q, k, v, mask=mask, feature_map=self.feature_map, bias=bias, **gate)
        if self.attention == "delta":
            if bias is not None:
                raise ValueError("attention='delta' cannot honour bias (there is no logits matrix)")
            return delta_attention(q, k, v, mask=mask, **gate)
        rate = 0.0 if deterministic else self.dropout_rate
        rng = self.make_rng("dropout") if rate > 0 else None
        sowing = self.is_mutable_collection("intermediates")
        if self.attention == "softmax" and not self.talking_heads:
            if sowing:
                scores = _with_bias(dot_scores(q, k), bias)
                self.sow("intermediates", "attention_weights", attention_weights(scores, mask=mask))
            return softmax_attention(q, k, v, mask=mask, bias=bias, impl=self.attention_impl, dropout_rate=rate,
                                     dropout_rng=rng)
        scores, head_mix = self._variant_scores(q, k, v.shape[1], mask, bias, inputs_q, positions)
        if sowing:
            self.sow("intermediates", "attention_weights", attention_weights(scores, mask=mask, head_mix=head_mix))
        return attend_scores(scores, v, mask=mask, head_mix=head_mix, dropout_rate=rate, dropout_rng=rng)

    def _variant_scores(self, q, k, lk, mask, bias, inputs_q, positions):
        """``[b, h, q, k]`` logits (bias added) of the dense variants, and talking-heads' post-softmax mixing."""
        init = dict(param_dtype=self.param_dtype, kernel_init=self.kernel_init)
        if self.attention == "softmax":  # talking heads: per-head logits (and biases), then mixed
            return TalkingHeads(self.num_heads, self.param_dtype, name="talking_heads")(
                _with_bias(dot_scores(q, k), bias))
        if self.attention == "additive":
            return _with_bias(AdditiveScores(dtype=self.dtype, **init, name="additive")(q, k), bias), None
        q_pos, k_pos = self._synthesizer_positions(inputs_q, lk, mask, positions)
        if self.attention == "synthesizer_dense":
            head_dim = self.head_dim or inputs_q.shape[-1] // self.num_heads
            scores = DenseSynthesizerScores(self.num_heads, head_dim, self.max_len, dtype=self.dtype, **init,
                                            name="synthesizer")(inputs_q, k_pos)
        else:
            scores = RandomSynthesizerScores(self.num_heads, self.max_len, **init, name="synthesizer")(q_pos, k_pos)
        return _with_bias(scores, bias), None

    def _synthesizer_positions(self, inputs_q, lk, mask, positions):
        """Query and key positions ``[b, q]``, ``[b, k]`` that index the Synthesizer tables: positions within each
        packed document (``positions``), or ``0..`` offset by the mask's ``q_offset`` against a decode cache."""
        b, lq = inputs_q.shape[:2]
        if positions is not None and lq == lk:
            return positions, positions
        offset = 0 if mask is None or mask.q_offset is None else jnp.reshape(mask.q_offset, (-1, 1))
        q_pos = positions if positions is not None else jnp.broadcast_to(jnp.arange(lq)[None] + offset, (b, lq))
        return q_pos, jnp.broadcast_to(jnp.arange(lk), (b, lk))

    def _cross_kv(self, inputs_kv, kv_heads, head_dim, decode):
        """Cross-attention keys/values; when decoding, projected once at prefill and cached."""
        if decode == "step":
            return self.get_variable("cache", "cross_key"), self.get_variable("cache", "cross_value")
        k = self._project("key", inputs_kv, kv_heads, head_dim, "kv_heads")
        v = self._project("value", inputs_kv, kv_heads, head_dim, "kv_heads")
        if decode == "prefill" and self.is_mutable_collection("cache"):
            self.put_variable("cache", "cross_key", k)
            self.put_variable("cache", "cross_value", v)
        return k, v

    def _softmax_cache(self, k, v, cache_index):
        """Write this call's keys/values at ``cache_index``; return the whole cache (its shape is fixed at init).
        ``k`` is None for the Synthesizers, which need no keys."""
        entries = {"cached_key": k, "cached_value": v}
        initializing = not self.has_variable("cache", "cached_value")
        cached = {name: self.variable("cache", name, jnp.zeros, x.shape, x.dtype)
                  for name, x in entries.items() if x is not None}
        if initializing:
            return k, v
        if cache_index is None:
            raise ValueError("decode needs cache_index (where this call's tokens go in the cache)")
        for name, var in cached.items():
            var.value = lax.dynamic_update_slice(var.value, entries[name].astype(var.value.dtype),
                                                 (0, cache_index, 0, 0))
        return (cached["cached_key"].value if k is not None else None), cached["cached_value"].value

    def _recurrent_decode(self, q, k, v, mask, decode, gate):
        """Linear or delta self-attention against its recurrent state: prefill reads the prompt, a step adds one
        token. ``gate``: `_recurrent_gate`'s decay and, for delta, ``beta``."""
        if self.attention == "delta":
            return self._delta_decode(q, k, v, mask, decode, gate)
        initializing = not self.has_variable("cache", "linear_state")
        b, _, n, d = k.shape
        state = self.variable("cache", "linear_state",
                              lambda: linear_init_state(b, n, d, v.shape[-1], self.feature_map))
        no_offset = None if mask is None else dataclasses.replace(mask, q_offset=None)
        if initializing:
            return linear_attention(q, k, v, mask=no_offset, feature_map=self.feature_map, **gate)
        if decode == "prefill":
            kv_valid = None if mask is None else mask.kv_valid_mask(k.shape[1])
            state.value = linear_prefill_state(k, v, feature_map=self.feature_map, kv_valid=kv_valid, **gate)
            return linear_attention(q, k, v, mask=no_offset, feature_map=self.feature_map, **gate)
        if q.shape[1] != 1:
            raise ValueError(f"linear-attention decode steps take one token at a time, got {q.shape[1]}")
        if "log_decay" in gate:
            gate = {"log_decay": gate["log_decay"][:, 0]}
        out, state.value = linear_step(state.value, q[:, 0], k[:, 0], v[:, 0], feature_map=self.feature_map, **gate)
        return out[:, None]

    def _delta_decode(self, q, k, v, mask, decode, gate):
        """The delta rule against its state ``delta_state [b, n, d, v]``: the prompt's is kept at prefill, a step
        updates it by one token."""
        initializing = not self.has_variable("cache", "delta_state")
        b, _, n, d = k.shape
        state = self.variable("cache", "delta_state", lambda: delta_init_state(b, n, d, v.shape[-1]))
        no_offset = None if mask is None else dataclasses.replace(mask, q_offset=None)
        if initializing:
            return delta_attention(q, k, v, mask=no_offset, **gate)
        if decode == "prefill":
            out, state.value = delta_attention(q, k, v, mask=no_offset, return_state=True, **gate)
            return out
        if q.shape[1] != 1:
            raise ValueError(f"delta-rule decode steps take one token at a time, got {q.shape[1]}")
        one = {name: x[:, 0] for name, x in gate.items() if name != "decay"}
        out, state.value = delta_step(state.value, q[:, 0], k[:, 0], v[:, 0], one.pop("beta"),
                                      decay=gate.get("decay"), **one)
        return out[:, None]
