"""`pallas_delta`: the (gated) delta rule's chunk form as one fused Pallas kernel, the state carried on chip.

The GPU counterpart of `delta._blocks`. One program per (batch row, query head, value tile) walks the sequence in
blocks of c positions with a `lax.fori_loop`, carrying the state ``S [d, bv]`` in float32 (the rule acts on each
value column alone, so value tiles are independent). Per block, with ``D_ri = exp(G_r - G_i)`` for keys i <= r of
row r's run (`pallas_tiles.block_step`), ``g_r = exp(G_r)`` where row r reads the entering state (0 elsewhere) and
``S0`` that state (see `delta` for the derivation)::

    T = (I + strict_tril(beta K K^T * D))^-1                  by forward substitution, one row at a time
    U = T (beta V) - T (beta g K) S0                            the pseudo-values
    O = g Q S0 + (tril(Q K^T) * D) U
    S_end = g_c S0 (0 if the block starts a new run) + (K * D_c.)^T U   (keys of the block's last run)

Inputs are unit q and k and float32 values, as `delta._blocks` takes them; everything is float32 (the system's
inverse is less forgiving than linear attention's sums). The backward is a `custom_vjp` that differentiates the XLA
form (`delta._blocks`) on the same inputs: only the forward is a kernel.

Shape key: b batch, l length (padded to a block multiple inside), n kv heads, g = h // n query heads per kv head,
d head dim, v value dim (both padded to powers of two >= 16), c block length.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .linear_causal import run_ids
from .pallas_tiles import block_length, block_step, dot, padded_dim, scale, scale_rows, tile_size


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static description of one call (hashable: a `custom_vjp` non-diff argument)."""

    block: int  # c
    block_v: int  # value tile of one program
    groups: int  # g
    interpret: bool


def pallas_delta(q: jax.Array, k: jax.Array, v: jax.Array, beta: jax.Array, seg: jax.Array | None,
                 log_decay: jax.Array | None, *, block: int = 64, block_v: int = 64,
                 interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """The delta rule's outputs ``[b, l, n, g, v]`` and final state ``[b, n, d, v]`` (that of the last segment),
    float32: `delta._blocks` as a kernel.

    Args:
      q: unit queries ``[b, l, n, g, d]``; k: unit keys ``[b, l, n, d]`` (zero where padding hides a key);
        v: values ``[b, l, n, v]``.
      beta: ``[b, l, n]`` writing strengths (0 where padding hides a key).
      seg: int segment ids ``[b, l]`` (the state restarts where they change), or None.
      log_decay: float ``[b, l, n]`` (<= 0; 0 where padding hides a key), or None for no decay.
      block: block length c, a power of two >= 16, clipped to 128 and to l rounded up to a power of two.
      block_v: value tile per program, a power of two >= 16 (clipped to the padded value dim).
      interpret: Pallas interpret mode; None uses it exactly when JAX runs on the CPU.
    """
    b, l, n, g, d = q.shape
    plan = _Plan(block=block_length(block, l), block_v=min(tile_size("block_v", block_v, None),
                                                           padded_dim(v.shape[-1])),
                 groups=g, interpret=jax.default_backend() == "cpu" if interpret is None else bool(interpret))
    runs = run_ids(seg)
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    return _delta(plan, f32(q), f32(k), f32(v), f32(beta), runs, f32(log_decay))


# -- custom_vjp: the kernel forward, the XLA form's backward ---------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _delta(plan: _Plan, q, k, v, beta, runs, log_decay):
    return _forward(plan, q, k, v, beta, runs, log_decay)


def _delta_fwd(plan: _Plan, q, k, v, beta, runs, log_decay):
    return _forward(plan, q, k, v, beta, runs, log_decay), (q, k, v, beta, runs, log_decay)


def _delta_bwd(plan: _Plan, res, cotangents):
    from .delta import _blocks  # imported here: delta imports this module
    q, k, v, beta, runs, log_decay = res

    def xla(q, k, v, beta, log_decay):
        return _blocks(q, k, v, beta, log_decay, runs, plan.block)

    grads = jax.vjp(xla, q, k, v, beta, log_decay)[1](cotangents)
    return grads[:4] + (None, grads[4])


_delta.defvjp(_delta_fwd, _delta_bwd)


def _forward(plan: _Plan, q, k, v, beta, runs, log_decay):
    """Pad, lay out for the kernel, run it, and cut back: ``(out [b, l, n, g, v], state [b, n, d, v])``."""
    b, l, n, g, d = q.shape
    dv, c, bv = v.shape[-1], plan.block, plan.block_v
    lp, dp, vp = -(-l // c) * c, padded_dim(d), padded_dim(dv)
    pad = lambda x, dim: jnp.pad(x, [(0, 0), (0, lp - l), (0, 0), (0, dim - x.shape[-1])])
    by_head = lambda x: jnp.pad(jnp.moveaxis(x, 1, 2), [(0, 0), (0, 0), (0, lp - l)])  # [b, l, n] -> [b, n, lp]
    operands = [pad(q.reshape(b, l, n * g, d), dp), pad(k, dp), pad(v, vp), by_head(beta)]
    kv_head = lambda bi, hi, vi: (bi, lax.div(hi, g), 0)
    specs = [pl.BlockSpec((None, lp, None, dp), lambda bi, hi, vi: (bi, 0, hi, 0)),
             pl.BlockSpec((None, lp, None, dp), lambda bi, hi, vi: (bi, 0, lax.div(hi, g), 0)),
             pl.BlockSpec((None, lp, None, bv), lambda bi, hi, vi: (bi, 0, lax.div(hi, g), vi)),
             pl.BlockSpec((None, None, lp), kv_head)]
    if log_decay is not None:  # padded positions do not decay
        operands.append(by_head(log_decay))
        specs.append(pl.BlockSpec((None, None, lp), kv_head))
    if runs is not None:  # padded positions join the last run: with zero keys and beta they change nothing
        operands.append(jnp.pad(runs, [(0, 0), (0, lp - l)], mode="edge"))
        specs.append(pl.BlockSpec((None, lp), lambda bi, hi, vi: (bi, 0)))
    h = n * g
    out, state = pl.pallas_call(
        functools.partial(_kernel, plan=plan, decayed=log_decay is not None, segmented=runs is not None),
        grid=(b, h, vp // bv), in_specs=specs,
        out_specs=[pl.BlockSpec((None, lp, None, bv), lambda bi, hi, vi: (bi, 0, hi, vi)),
                   pl.BlockSpec((None, None, dp, bv), lambda bi, hi, vi: (bi, hi, 0, vi))],
        out_shape=[jax.ShapeDtypeStruct((b, lp, h, vp), jnp.float32),
                   jax.ShapeDtypeStruct((b, h, dp, vp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4 if max(dp, bv) <= 64 else 8, num_stages=2),
        interpret=plan.interpret, name="delta_rule_forward",
    )(*operands)
    out = out[:, :l, :, :dv].reshape(b, l, n, g, dv)
    return out, state[:, ::g, :d, :dv]  # every query head of a kv head carries the same state


# -- the kernel -------------------------------------------------------------------------------------------------------
def _unit_lower_inverse(a: jax.Array, row: jax.Array) -> jax.Array:
    """``(I + a)^-1`` for strictly lower-triangular ``a [c, c]`` by forward substitution, one row at a time
    (``row``: the row index of each entry): row r is ``e_r - sum_{j < r} a_rj T_j`` once rows j < r are final."""
    c = a.shape[0]

    def body(r, t):
        a_r = jnp.sum(jnp.where(row == r, a, 0.0), axis=0)  # [c]: row r of a, zero from column r on
        return jnp.where(row == r, t - jnp.sum(a_r[:, None] * t, axis=0)[None, :], t)

    col = jnp.broadcast_to(jnp.arange(c)[None, :], (c, c))
    return lax.fori_loop(1, c, body, jnp.where(row == col, 1.0, 0.0))


def _kernel(q_ref, k_ref, v_ref, beta_ref, *refs, plan: _Plan, decayed: bool, segmented: bool):
    """One (batch row, query head, value tile): ``q [l, d]``, ``k [l, d]``, ``v [l, bv]``, ``beta [l]``,
    ``log_decay [l]``, ``runs [l]`` (where present) -> ``out [l, bv]``, ``state [d, bv]``, block by block."""
    refs = list(refs)
    decay_ref = refs.pop(0) if decayed else None
    run_ref = refs.pop(0) if segmented else None
    out_ref, state_ref = refs
    c = plan.block
    row = jnp.broadcast_to(jnp.arange(c)[:, None], (c, c))
    strict = jnp.broadcast_to(jnp.arange(c)[None, :], (c, c)) < row  # [c(r), c(i)]: i < r

    def body(i, carry):
        s, run = carry  # s [d, bv] float32; run: the carried state's (segmented only)
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        q, k, v, beta = q_ref[rows, :], k_ref[rows, :], v_ref[rows, :], beta_ref[rows]
        step = block_step(rows, c, decay_ref, run_ref, run)
        system = beta[:, None] * dot(k, k, trans_b=True) * jnp.where(strict, step.pair, 0.0)
        inverse = _unit_lower_inverse(system, row)
        k_in = scale_rows(k, beta if step.read is None else beta * step.read)  # beta g K: reads the entering state
        u = dot(inverse, scale_rows(v, beta)) - dot(dot(inverse, k_in), s)  # [c, bv]
        out_ref[rows, :] = scale_rows(dot(q, s), step.read) + dot(dot(q, k, trans_b=True) * step.pair, u)
        s = scale(s, step.keep) + dot(scale_rows(k, step.add), u, trans_a=True)
        return s, step.run

    d, bv = q_ref.shape[-1], v_ref.shape[-1]
    state, _ = lax.fori_loop(0, q_ref.shape[0] // c, body, (jnp.zeros((d, bv), jnp.float32), jnp.int32(-1)))
    state_ref[...] = state
