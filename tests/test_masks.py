"""Mask: dense form against the entry-by-entry reference, tiles, combination, pytree, bounds, and errors."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference
from cases import B, MASK_CASES, build, qkv
from flaxformer_lite.attention import Mask, attend_scores, attention_weights, linear_attention, softmax_attention

# Every kernel entry point, called on q [2, 16, 4, 16], k/v [2, 16, 2, 16] (logits [2, 4, 16, 16]).
KERNELS = {
    "softmax": lambda q, k, v, mask: softmax_attention(q, k, v, mask=mask, impl="reference"),
    "blockwise": lambda q, k, v, mask: softmax_attention(q, k, v, mask=mask, impl="blockwise", block_q=8,
                                                         block_kv=8),
    "linear": lambda q, k, v, mask: linear_attention(q, k, v, mask=mask),
    "attend_scores": lambda q, k, v, mask: attend_scores(jnp.zeros((2, 4, 16, 16)), v, mask=mask),
    "attention_weights": lambda q, k, v, mask: attention_weights(jnp.zeros((2, 4, 16, 16)), mask=mask),
}


@pytest.mark.parametrize("name", sorted(MASK_CASES))
def test_materialize_matches_reference(name):
    lq, lk, mask, dense = build(name)
    got = np.asarray(mask.materialize(lq, lk))
    assert got.dtype == bool and got.shape in ((B, 1, lq, lk), (1, 1, lq, lk))
    np.testing.assert_array_equal(np.broadcast_to(got[:, 0], dense.shape), dense)


def test_materialize_infers_lengths_from_fields():
    seg = jnp.array([[0, 0, 1, 1, 1]])
    assert Mask(q_segment_ids=seg, kv_segment_ids=seg).materialize().shape == (1, 1, 5, 5)
    with pytest.raises(ValueError, match="lq and lk"):
        Mask(causal=True).materialize()


@pytest.mark.parametrize("name", ["causal", "segments_causal", "prefix_padding", "cross_causal_offset", "kv_valid",
                                  "window_segments", "cross_window_offset"])
def test_block_is_a_tile_of_materialize(name):
    lq, lk, mask, _ = build(name)
    full = np.asarray(mask.materialize(lq, lk))
    block = jax.jit(mask.block, static_argnums=(1, 3))
    for qs, ks in [(0, 0), (4, 9), (lq - 5, lk - 7), (3, 0)]:
        tile = np.asarray(block(qs, 5, ks, 7))
        np.testing.assert_array_equal(tile, full[:, :, qs:qs + 5, ks:ks + 7])


COMBINABLE = ["causal", "prefix", "kv_lengths", "kv_valid", "segments", "prefix_padding", "window"]


@pytest.mark.parametrize("a,b", list(itertools.combinations(COMBINABLE, 2)))
def test_and_is_intersection(a, b):
    _, _, ma, da = build(a)
    _, _, mb, db = build(b)
    if ma.has_segments and mb.has_segments:
        pytest.skip("two segment masks cannot be combined")
    combined = np.asarray((ma & mb).materialize(37, 37))
    np.testing.assert_array_equal(np.broadcast_to(combined[:, 0], da.shape), da & db)


def test_and_of_two_windows_keeps_the_smaller():
    seg = jnp.asarray(np.array([[0] * 9 + [1] * 7]))
    wide = Mask(causal=True, window=7, q_segment_ids=seg, kv_segment_ids=seg)
    for a, b in ((wide, Mask(causal=True, window=3)), (Mask(causal=True, window=3), wide)):
        both = a & b
        assert both.window == 3 and both.causal and both.has_segments
        want = reference.dense_mask(1, 16, 16, causal=True, window=3, q_segment_ids=np.asarray(seg),
                                    kv_segment_ids=np.asarray(seg))
        np.testing.assert_array_equal(np.asarray(both.materialize(16, 16))[:, 0], want)


def test_and_errors():
    seg = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment ids"):
        Mask(q_segment_ids=seg, kv_segment_ids=seg) & Mask(q_segment_ids=seg, kv_segment_ids=seg)
    with pytest.raises(ValueError, match="q_offset"):
        Mask(causal=True, q_offset=1) & Mask(causal=True, q_offset=2)


def test_prefix_implies_causal():
    m = Mask(prefix_lengths=jnp.array([2]))
    assert m.causal
    dense = np.asarray(m.materialize(4, 4))[0, 0]
    np.testing.assert_array_equal(dense, reference.dense_mask(1, 4, 4, prefix_lengths=[2])[0])


def test_pytree_through_jit():
    _, _, mask, dense = build("prefix_padding")
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    assert len(leaves) == 2  # prefix_lengths, kv_lengths; causal is static structure
    got = jax.jit(lambda m: m.materialize(37, 37))(mask)
    np.testing.assert_array_equal(np.asarray(got)[:, 0], dense)


def test_window_is_static_structure():
    lq, lk, mask, dense = build("cross_window_offset")
    leaves, treedef = jax.tree_util.tree_flatten(mask)
    assert len(leaves) == 2 and mask.window == 7  # q_offset, kv_lengths; the window rides in the treedef
    assert jax.tree_util.tree_unflatten(treedef, leaves).window == 7
    assert treedef != jax.tree_util.tree_structure(Mask(causal=True, window=8, q_offset=mask.q_offset,
                                                        kv_lengths=mask.kv_lengths))
    got = jax.jit(lambda m: m.materialize(lq, lk))(mask)
    np.testing.assert_array_equal(np.asarray(got)[:, 0], dense)
    assert "window=7" in repr(mask) and Mask(causal=True, window=np.int64(3)).window == 3


def test_window_matches_hugging_face_convention():
    """transformers' sliding_window_causal_mask_function(3) docstring picture: row 3 sees keys 1..3."""
    got = np.asarray(Mask(causal=True, window=3).materialize(5, 5))[0, 0]
    np.testing.assert_array_equal(got, np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                 [0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], bool))
    one = np.asarray(Mask(causal=True, window=1).materialize(4, 4))[0, 0]
    np.testing.assert_array_equal(one, np.eye(4, dtype=bool))


def test_pad_to_never_attends_padding():
    _, _, mask, dense = build("segments_causal")
    padded = np.asarray(mask.pad_to(40, 45).materialize(40, 45))[:, 0]
    np.testing.assert_array_equal(padded[:, :37, :37], dense)
    assert not padded[:, :37, 37:].any() and not padded[:, 37:, :].any()


@pytest.mark.parametrize("name", ["causal", "prefix", "prefix_padding", "kv_lengths", "cross_causal_offset",
                                  "cross_padding", "segments_causal", "window", "window_segments",
                                  "cross_window_offset"])
def test_skip_bounds_are_sound(name):
    """No visible pair lies outside kv_stop / q_start_for / kv_start_for / q_stop_for: block skipping never drops
    real work."""
    lq, lk, mask, dense = build(name)
    for q_stop in range(1, lq + 1):
        stop = int(mask.kv_stop(q_stop, lk))
        assert not dense[:, :q_stop, stop:].any(), (q_stop, stop)
    for kv_start in range(lk):
        first = int(mask.q_start_for(kv_start))
        assert not dense[:, :first, kv_start:].any(), (kv_start, first)
    for q_start in range(lq):
        first = int(mask.kv_start_for(q_start))
        assert not dense[:, q_start:, :first].any(), (q_start, first)
    for kv_stop in range(1, lk + 1):
        stop = int(mask.q_stop_for(kv_stop, lq))
        assert 0 <= stop <= lq and not dense[:, stop:, :kv_stop].any(), (kv_stop, stop)


def test_causal_bounds_are_tight():
    m = Mask(causal=True)
    assert int(m.kv_stop(8, 100)) == 8 and int(m.q_start_for(8)) == 8
    assert int(Mask(causal=True, kv_lengths=jnp.array([3, 5])).kv_stop(8, 100)) == 5
    assert int(m.kv_start_for(50)) == 0 and int(m.q_stop_for(8, 100)) == 100  # no window: nothing left of a band


def test_window_bounds_are_tight():
    m = Mask(causal=True, window=4)  # row i sees keys i-3..i
    assert int(m.kv_start_for(10)) == 7 and int(m.kv_start_for(2)) == 0
    assert int(m.q_stop_for(8, 100)) == 11 and int(m.q_stop_for(99, 100)) == 100  # key 7 is last seen by row 10
    off = Mask(causal=True, window=4, q_offset=jnp.array([5, 9]))  # any batch row: the smaller offset bounds
    assert int(off.kv_start_for(10)) == 12 and int(off.q_stop_for(8, 100)) == 6


@pytest.mark.parametrize("kwargs,field", [
    ({"kv_lengths": jnp.zeros((2, 3), jnp.int32)}, "kv_lengths"),
    ({"kv_lengths": jnp.zeros((2,), jnp.float32)}, "kv_lengths"),
    ({"prefix_lengths": jnp.array(3)}, "prefix_lengths"),
    ({"kv_valid": jnp.ones((2, 3), jnp.int32)}, "kv_valid"),
    ({"kv_valid": jnp.ones((3,), bool)}, "kv_valid"),
    ({"q_segment_ids": jnp.zeros((2, 3), jnp.int32)}, "segment_ids"),
    ({"q_segment_ids": jnp.zeros((2, 3)), "kv_segment_ids": jnp.zeros((2, 3))}, "q_segment_ids"),
    ({"causal": jnp.array(True)}, "causal"),
    ({"causal": True, "q_offset": 1.5}, "q_offset"),
    ({"window": 4}, "window needs causal=True"),
    ({"causal": True, "window": 0}, "window must be >= 1"),
    ({"causal": True, "window": 2.5}, "window must be a Python int"),
    ({"causal": True, "window": True}, "window must be a Python int"),
    ({"causal": True, "window": jnp.array(4)}, "window must be a Python int"),
    ({"prefix_lengths": jnp.array([2, 3]), "window": 4}, "window cannot be combined with Mask.prefix_lengths"),
    ({"kv_lengths": jnp.zeros((2,), jnp.int32), "prefix_lengths": jnp.zeros((3,), jnp.int32)}, "batch size"),
    ({"kv_valid": jnp.ones((2, 3), bool), "q_segment_ids": jnp.zeros((2, 3), jnp.int32),
      "kv_segment_ids": jnp.zeros((2, 4), jnp.int32)}, "key length"),
])
def test_invalid_fields_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Mask(**kwargs)


def test_check_shapes():
    m = Mask(kv_valid=jnp.ones((2, 5), bool))
    m.check_shapes(2, 3, 5)
    with pytest.raises(ValueError, match="batch"):
        m.check_shapes(3, 3, 5)
    with pytest.raises(ValueError, match="key length"):
        m.check_shapes(2, 3, 6)


def test_every_row_sees_a_key_is_conservative():
    seg = jnp.array([[0, 0, 1, 1]])
    assert Mask(causal=True).every_row_sees_a_key and Mask().every_row_sees_a_key
    assert Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg).every_row_sees_a_key
    assert not Mask(causal=True, q_segment_ids=seg, kv_segment_ids=jnp.array([[0, 0, 1, 1]])).every_row_sees_a_key
    assert not Mask(kv_lengths=jnp.array([3])).every_row_sees_a_key
    assert not Mask(causal=True, q_offset=2).every_row_sees_a_key
    for m in (Mask(causal=True), Mask(causal=True, q_segment_ids=seg, kv_segment_ids=seg),
              Mask(prefix_lengths=jnp.array([2]))):
        assert np.asarray(m.materialize(4, 4)).any(-1).all()  # the guarantee holds


@pytest.mark.parametrize("field,values,bad", [
    ("kv_lengths", [40, 3], 40),  # past the 16 keys
    ("kv_lengths", [5, -1], -1),
    ("prefix_lengths", [-2, 3], -2),
    ("prefix_lengths", [4, 17], 17),
], ids=["kv_lengths_too_long", "kv_lengths_negative", "prefix_negative", "prefix_too_long"])
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_lengths_out_of_range_raise(kernel, field, values, bad):
    """Lengths outside [0, lk] used to be clamped silently; concrete ones now fail at the kernel entry."""
    _, (q, k, v) = qkv(16, 16)
    mask = Mask(**{field: jnp.array(values)})
    with pytest.raises(ValueError, match=rf"^Mask\.{field} must be in \[0, 16\] \(the key length\), got {bad} "):
        KERNELS[kernel](q, k, v, mask)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_lengths_in_range_pass_eagerly_and_under_jit(kernel):
    """The bounds 0 and lk are valid; under jit the values are tracers, not checked, and the call still works."""
    _, (q, k, v) = qkv(16, 16)
    mask = Mask(prefix_lengths=jnp.array([0, 16]), kv_lengths=jnp.array([16, 0]))
    eager = KERNELS[kernel](q, k, v, mask)
    jitted = jax.jit(KERNELS[kernel])(q, k, v, mask)
    assert np.isfinite(eager).all()
    np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
    bad = Mask(kv_lengths=jnp.array([40, 3]))
    jax.jit(KERNELS[kernel])(q, k, v, bad)  # traced: cannot be read, so not checked


def test_one_segment_array_stays_shared_through_jit_and_combination():
    """Self-attention's one segment array is static structure: through `jax.jit` (two leaves arrive) and `&`, the
    mask still knows every row sees its own position (splash attention and the row zeroing rely on it)."""
    seg = np.array([[0, 0, 1, 1]])
    shared, separate = Mask(q_segment_ids=seg, kv_segment_ids=seg), Mask(q_segment_ids=seg, kv_segment_ids=seg + 0)
    assert shared.shares_segments and shared.every_row_sees_a_key and not separate.shares_segments
    seen = {}

    @jax.jit
    def f(m):
        seen["jit"] = m.shares_segments
        seen["and"] = (Mask(causal=True) & m).shares_segments and (m & Mask(causal=True)).shares_segments
        return m.q_segment_ids

    f(shared)
    assert seen == {"jit": True, "and": True}
    f(separate)
    assert seen == {"jit": False, "and": False}
    assert not shared.pad_to(6, 6).shares_segments  # padded rows and keys get ids of their own
