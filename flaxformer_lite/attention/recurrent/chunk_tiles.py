"""Tiles and block steps shared by the chunk-form Pallas kernels (`linear_pallas`, `delta_pallas`); the tile helpers
every Pallas kernel takes (`pallas_call`, `dot`, tile sizes) are in `attention.pallas`.

Those kernels cut a sequence in blocks of c positions, as flash-linear-attention's chunk kernels do: a kernel that
walks the blocks in order carries a state from block to block and stores the state entering each; kernels with a
grid axis over blocks do each block's own (quadratic) work in parallel from those stored states. Every grid is
``(blocks, b, heads, value tiles)`` (`Specs`; a walk has one entry along the first axis and sees the whole row).

Within a block, the pairs (row i, key j) that interact carry a decay ``exp(A_i - A_j)`` (``A``: the log decay summed
from the block's start, 1 without decay) and must lie in one run of the packed segments; the carried state is read,
decayed, reset and added to according to the runs at the block's two ends. `block_step` computes all of that once,
for a walk in either direction.

Segment ids become run indices (`common.run_ids`: 0, 1, 2, ... up the sequence, a new one at each change)
before a kernel, so a run is a contiguous range, and a block's last run is its largest index and its first run its
smallest. So the run of the state carried into a block is known without the walk: the largest run id of the block
before (`carried_run`), which lets the parallel kernels apply the same masks.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ..pallas import padded_dim, pallas_call


def operands(q, k, v, per_kv_head: list, runs, block: int, dtype) -> list:
    """A chunk kernel's operands, zero padded to ``lp`` positions (a multiple of ``block``) and powers of two.

    ``q [b, l, n, g, d] -> [b, lp, h, dp]``, ``k [b, l, n, d] -> [b, lp, n, dp]`` and ``v [b, l, n, v] ->
    [b, lp, n, vp]`` in ``dtype``; each array of ``per_kv_head`` not None, ``[b, l, n] -> [b, n, lp]`` float32; then
    ``runs [b, l] -> [b, lp]`` if not None. Padded positions join the last run (zero keys, values and decays change
    no state)."""
    b, l, n, g, d = q.shape
    lp = -(-l // block) * block
    dp, vp = padded_dim(d), padded_dim(v.shape[-1])
    pad = lambda x, dim: jnp.pad(x.astype(dtype), [(0, 0), (0, lp - l), (0, 0), (0, dim - x.shape[-1])])
    out = [pad(q.reshape(b, l, n * g, d), dp), pad(k, dp), pad(v, vp)]
    out += [jnp.pad(jnp.moveaxis(x.astype(jnp.float32), 1, 2), [(0, 0), (0, 0), (0, lp - l)])
            for x in per_kv_head if x is not None]
    if runs is not None:
        out.append(jnp.pad(runs, [(0, 0), (0, lp - l)], mode="edge"))
    return out


@dataclasses.dataclass(frozen=True)
class Specs:
    """Block specs over a chunk kernel's grid ``(blocks, b, heads, value tiles)``.

    A program sees ``span`` positions of a row: c, its own block, on a grid over blocks (the parallel kernels); or
    lp, the whole row, on a grid with one entry along the first axis (the kernels that walk the blocks in order).
    ``per`` is how many of the grid's heads share an operand's head: g for a kv-head operand on a grid over query
    heads, else 1. Arrays: ``[b, lp, heads, dim]`` rows, ``[b, heads, lp]`` per-position values, ``[b, lp]`` run ids,
    ``[b, blocks, heads, dim, vp]`` the states entering the blocks."""

    span: int
    block_v: int

    def rows(self, dim: int, per: int = 1, tile: bool = False) -> pl.BlockSpec:
        """``[b, lp, heads, dim]``: the program's positions, all ``dim`` columns or (``tile``) its value tile."""
        return pl.BlockSpec((None, self.span, None, self.block_v if tile else dim),
                            lambda ci, bi, hi, vi: (bi, ci, _head(hi, per), vi if tile else 0))

    def positions(self, per: int = 1) -> pl.BlockSpec:
        """``[b, heads, lp]``: one value per position."""
        return pl.BlockSpec((None, None, self.span), lambda ci, bi, hi, vi: (bi, _head(hi, per), ci))

    def runs(self, neighbour: int = 0, blocks: int | None = None) -> pl.BlockSpec:
        """``[b, lp]`` run ids: the program's, or on a grid over blocks those of the block before it (``neighbour``
        -1; block 0 gets its own) or after it (+1, with the grid's ``blocks``; the last block gets its own): see
        `carried_run`."""
        if neighbour == -1:
            return pl.BlockSpec((None, self.span), lambda ci, bi, hi, vi: (bi, jnp.maximum(ci - 1, 0)))
        if neighbour == 1:
            return pl.BlockSpec((None, self.span), lambda ci, bi, hi, vi: (bi, jnp.minimum(ci + 1, blocks - 1)))
        return pl.BlockSpec((None, self.span), lambda ci, bi, hi, vi: (bi, ci))

    def state(self, dim: int, per: int = 1) -> pl.BlockSpec:
        """``[b, blocks, heads, dim, vp]``: the value tile of the state entering the program's block."""
        return pl.BlockSpec((None, None, None, dim, self.block_v),
                            lambda ci, bi, hi, vi: (bi, ci, _head(hi, per), 0, vi))

    def states(self, blocks: int, dim: int, per: int = 1) -> pl.BlockSpec:
        """``[b, blocks, heads, dim, vp]``: the value tile of the states entering every block of the row."""
        return pl.BlockSpec((None, blocks, None, dim, self.block_v),
                            lambda ci, bi, hi, vi: (bi, 0, _head(hi, per), 0, vi))

    def last(self, dim: int) -> pl.BlockSpec:
        """``[b, heads, dim, vp]``: the value tile of one state per row and head (the final one)."""
        return pl.BlockSpec((None, None, dim, self.block_v), lambda ci, bi, hi, vi: (bi, hi, 0, vi))

    def tile_copies(self) -> pl.BlockSpec:
        """``[b, heads, tiles, lp]``: one value per position written by each value tile (its copy or share)."""
        return pl.BlockSpec((None, None, None, self.span), lambda ci, bi, hi, vi: (bi, hi, vi, ci))

    def tile_shares(self, dim: int) -> pl.BlockSpec:
        """``[b, tiles, lp, heads, dim]``: each value tile's share of a gradient of rows (summed outside)."""
        return pl.BlockSpec((None, None, self.span, None, dim), lambda ci, bi, hi, vi: (bi, vi, ci, hi, 0))

    def sum(self, dim: int, per: int = 1) -> pl.BlockSpec:
        """``[b, blocks, heads, tiles, dim]``: a vector entering the program's block (as linear attention's key sum),
        one copy per value tile."""
        return pl.BlockSpec((None, None, None, None, dim), lambda ci, bi, hi, vi: (bi, ci, _head(hi, per), vi, 0))

    def sums(self, blocks: int, dim: int, per: int = 1) -> pl.BlockSpec:
        """``[b, blocks, heads, tiles, dim]``: the vectors entering every block of the row, the value tile's copy."""
        return pl.BlockSpec((None, blocks, None, None, dim), lambda ci, bi, hi, vi: (bi, 0, _head(hi, per), vi, 0))


class Grid(NamedTuple):
    """The sizes of one chunk kernel call, read off its padded operands (`operands`), and its specs."""

    lp: int  # positions, a multiple of the block length c
    heads: int  # query heads h
    dp: int  # head (or feature) dim, padded
    vp: int  # value dim, padded
    blocks: int  # lp / c
    tiles: int  # value tiles, vp / bv
    flags: dict  # the kernels' static keywords: c, decayed, segmented
    par: Specs  # for a grid over blocks
    seq: Specs  # for a grid walking the blocks


def grid(q, v, c: int, bv: int, log_decay, runs) -> Grid:
    """The `Grid` of a call on padded ``q [b, lp, h, dp]`` and ``v [b, lp, n, vp]``, in blocks of ``c`` and value
    tiles of ``bv``, with a log decay and run ids where ``log_decay``/``runs`` are not None."""
    _, lp, heads, dp = q.shape
    vp = v.shape[-1]
    flags = dict(c=c, decayed=log_decay is not None, segmented=runs is not None)
    return Grid(lp, heads, dp, vp, lp // c, vp // bv, flags, Specs(c, bv), Specs(lp, bv))


def _head(hi, per: int):
    return hi if per == 1 else lax.div(hi, per)


def carried_run(neighbour_ref, backward: bool = False) -> jax.Array:
    """In a program of a grid over blocks, the run of the state carried into its block: walking forward, the largest
    run id of the block before (``neighbour_ref``: `Specs.runs` with ``neighbour=-1``), -1 before the first block;
    walking ``backward``, the smallest of the block after (``neighbour=+1``), -1 after the last."""
    if backward:
        return jnp.where(pl.program_id(0) < pl.num_programs(0) - 1, jnp.min(neighbour_ref[...]), -1)
    return jnp.where(pl.program_id(0) > 0, jnp.max(neighbour_ref[...]), -1)


def launch(kernel, operands: list, in_specs: list, out_specs: list, out_shape: list, grid: tuple, width: int,
           interpret: bool, name: str, num_warps: int | None = None):
    """`pallas_call` of a chunk kernel over ``grid`` ``(blocks, b, heads, value tiles)`` (see `Specs`), with
    ``num_warps`` warps per program, by default more for tiles wider than 64 (``width``: the largest of the head dim
    and value tile)."""
    num_warps = (4 if width <= 64 else 8) if num_warps is None else num_warps
    return pallas_call(kernel, operands, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                       num_warps=num_warps, interpret=interpret, name=name)


def f32(*shape) -> jax.ShapeDtypeStruct:
    """The ``out_shape`` of a float32 kernel output ``shape``."""
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def triangle(c: int, upper: bool = False) -> jax.Array:
    """``[c, c]`` bool: ``col <= row`` (``col >= row`` if ``upper``)."""
    row = jnp.broadcast_to(jnp.arange(c)[:, None], (c, c))
    col = jnp.broadcast_to(jnp.arange(c)[None, :], (c, c))
    return col >= row if upper else col <= row


def masked(flag, factor):
    """``factor`` (None: 1) where ``flag`` (None: everywhere), 0 elsewhere; None if both are None."""
    if flag is None:
        return factor
    return jnp.where(flag, 1.0 if factor is None else factor, 0.0)


def scale_rows(x: jax.Array, factor) -> jax.Array:
    """``x [c, d]`` as float32, rows times ``factor [c]`` (None: 1)."""
    x = x.astype(jnp.float32)
    return x if factor is None else x * factor[:, None]


def scale(x: jax.Array, factor) -> jax.Array:
    """``x`` times the scalar ``factor`` (None: 1)."""
    return x if factor is None else factor * x


class Step(NamedTuple):
    """One block of a walk carrying a state (None fields: 1 everywhere).

    pair: ``[c, c]`` float32: the decay of each visible (row i, key j) pair, 0 for hidden ones; rows are keys and
      columns queries (the transpose) in a backward walk.
    read: ``[c]``: the factor on the carried state where each position reads it (0: another run).
    add: ``[c]``: the factor on what each position adds to the state carried on (0: not the block's far run).
    keep: scalar: the factor on the carried state in the one carried on (0: the block starts a new run).
    run: int32 scalar: the run of the state carried on (the input run where there are no segments).
    """

    pair: jax.Array
    read: jax.Array | None
    add: jax.Array | None
    keep: jax.Array | None
    run: jax.Array


def block_step(rows, c: int, decay_ref, run_ref, carried, backward: bool = False) -> Step:
    """The `Step` for the block at ``rows`` (a ``pl.ds`` of c positions) of a walk forward (or ``backward``) along
    the sequence, from ``log_decay`` and run-id refs ``[l]`` (None: absent) and the ``carried`` state's run.

    Forward, a row reads the state of the blocks before it decayed by ``exp(A_i)`` and a key adds to the next one
    decayed by ``exp(A_last - A_j)``; backward (gradients flowing from later rows to earlier keys) the two swap."""
    lower = triangle(c)
    visible = triangle(c, upper=True) if backward else lower
    read = add = keep = None
    run = carried
    if run_ref is not None:
        ids = run_ref[rows]
        run = jnp.min(ids) if backward else jnp.max(ids)  # the block's far end in the walk's direction
        visible = visible & (jnp.broadcast_to(ids[:, None], (c, c)) == jnp.broadcast_to(ids[None, :], (c, c)))
        read, keep, add = ids == carried, run == carried, ids == run
    if decay_ref is None:
        return Step(jnp.where(visible, 1.0, 0.0), masked(read, None), masked(add, None), masked(keep, None), run)
    a = decay_ref[rows]
    cum = jnp.sum(jnp.where(lower, jnp.broadcast_to(a[None, :], (c, c)), 0.0), axis=1)  # A_i (a masked row sum)
    total = jnp.sum(a)  # A_last
    rows_a, cols_a = jnp.broadcast_to(cum[:, None], (c, c)), jnp.broadcast_to(cum[None, :], (c, c))
    gap = cols_a - rows_a if backward else rows_a - cols_a  # <= 0 where visible
    pair = jnp.where(visible, jnp.exp(jnp.where(visible, gap, 0.0)), 0.0)
    before, after = jnp.exp(cum), jnp.exp(total - cum)  # from the block's start to i, from i to its end
    read, add = (masked(read, after), masked(add, before)) if backward else (masked(read, before), masked(add, after))
    return Step(pair, read, add, masked(keep, jnp.exp(total)), run)
