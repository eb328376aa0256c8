"""Attention variants and ALBERT/conditional-norm switches: `attend_scores` and each variant's layer against the
papers' equations in float64 (tests/reference.py); causality and cached decoding == recompute for a GPT with each
switch; conditional norms; ALBERT's sharing == the same weights copied into every layer; config errors."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxformer_lite as ffl
import reference
from cases import B, build, tiny_config
from flaxformer_lite.attention import attend_scores, softmax_attention
from flaxformer_lite.layers import SHARED_LAYER, MultiHeadAttention, layer_name
from flaxformer_lite.layers.norms import make_norm
from flaxformer_lite.models import BERT, GPT, EncoderDecoder, ModelConfig

KINDS = {"additive": {"attention": "additive"}, "synthesizer_dense": {"attention": "synthesizer_dense"},
         "synthesizer_random": {"attention": "synthesizer_random"}, "talking_heads": {"talking_heads": True}}


def _perturb(variables, seed=1, scale=0.3):
    """Random values for every parameter (identity/zero initialisations would hide mistakes)."""
    leaves, tree = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype)
                                               for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("mask_case", ["none", "causal", "kv_lengths", "segments_causal", "cross_causal_offset"])
@pytest.mark.parametrize("mixed", [False, True])
def test_attend_scores_matches_reference(mask_case, mixed):
    lq, lk, mask, dense = build(mask_case)
    rng = np.random.default_rng(3)
    scores, v = rng.standard_normal((B, 4, lq, lk)) * 3, rng.standard_normal((B, lk, 2, 8))
    mix = rng.standard_normal((4, 4)) if mixed else None
    got = attend_scores(jnp.asarray(scores, jnp.float32), jnp.asarray(v, jnp.float32), mask=mask,
                        head_mix=None if mix is None else jnp.asarray(mix, jnp.float32))
    np.testing.assert_allclose(got, reference.attend_logits(scores, v, dense, mix), atol=1e-5, rtol=1e-5)


def test_attend_scores_of_dot_products_is_softmax_attention():
    (q, k, v), (qj, kj, vj) = __import__("cases").qkv(19, 19)
    _, _, mask, _ = build("none")
    scores = jnp.einsum("bqhd,bkhd->bhqk", qj, jnp.repeat(kj, 2, axis=2)) / np.sqrt(q.shape[-1])
    mask = ffl.attention.Mask(causal=True)
    np.testing.assert_allclose(attend_scores(scores, vj, mask=mask),
                               softmax_attention(qj, kj, vj, mask=mask, impl="reference"), atol=1e-5, rtol=1e-5)


def test_attend_scores_bad_input():
    v = jnp.zeros((2, 5, 2, 8))
    with pytest.raises(ValueError, match="scores must be"):
        attend_scores(jnp.zeros((2, 4, 5)), v)
    with pytest.raises(ValueError, match="does not fit"):
        attend_scores(jnp.zeros((2, 3, 5, 5)), v)
    with pytest.raises(ValueError, match="head_mix"):
        attend_scores(jnp.zeros((2, 4, 5, 5)), v, head_mix=jnp.eye(3))


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("mask_case", ["none", "causal", "kv_valid"])
def test_variant_layer_matches_reference(kind, mask_case):
    lq, _, mask, dense = build(mask_case)
    fields = dict(KINDS[kind])
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, max_len=48, **fields)
    x = np.random.default_rng(5).standard_normal((B, lq, 24))
    variables = _perturb(layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32)))
    got = layer.apply(variables, jnp.asarray(x, jnp.float32), mask=mask)
    want = reference.attention_variant(jax.tree.map(np.asarray, nn.unbox(variables["params"])), x,
                                       fields.get("attention", "softmax"), dense, talking_heads=kind == "talking_heads")
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_talking_heads_starts_as_plain_attention():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 9, 24)), jnp.float32)
    plain = MultiHeadAttention(num_heads=4, head_dim=8)
    talking = MultiHeadAttention(num_heads=4, head_dim=8, talking_heads=True)
    variables = talking.init(jax.random.key(0), x)
    shared = {"params": {k: v for k, v in variables["params"].items() if k != "talking_heads"}}
    mask = ffl.attention.Mask(causal=True)
    np.testing.assert_allclose(talking.apply(variables, x, mask=mask), plain.apply(shared, x, mask=mask),
                               atol=1e-6, rtol=1e-6)


GPT_SWITCHES = {**KINDS, "share_layers": {"share_layers": True}, "conditional_norm": {"condition_dim": 3},
                "albert_scan_remat": {"share_layers": True, "scan_layers": True, "remat": True}}


@pytest.fixture(scope="module", params=sorted(GPT_SWITCHES))
def gpt_switch(request):
    model = GPT(tiny_config(num_kv_heads=2, **GPT_SWITCHES[request.param]))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (3, 16)), jnp.int32)
    variables = _perturb(model.init(jax.random.key(0), tokens), scale=0.05)
    return model, variables, jax.jit(model.apply), tokens


def test_gpt_switch_is_causal(gpt_switch):
    _, variables, apply, tokens = gpt_switch
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % 97)
    before, after = apply(variables, tokens), apply(variables, changed)
    np.testing.assert_allclose(before[:, :9], after[:, :9], atol=1e-5)
    assert not np.allclose(before[:, 9:], after[:, 9:], atol=1e-3)


def test_gpt_switch_packed_document_equals_alone(gpt_switch):
    """A document packed after another (segment_ids; positions restart) gives the logits it gets alone."""
    model, variables, apply, tokens = gpt_switch
    segments = jnp.asarray([[0] * 6 + [1] * 10], jnp.int32)
    packed = jax.jit(lambda t, s: model.apply(variables, t, segment_ids=s))(tokens[:1], segments)
    alone = apply(variables, jnp.concatenate([tokens[:1, 6:], jnp.zeros((1, 6), jnp.int32)], 1))
    np.testing.assert_allclose(packed[0, 6:], alone[0, :10], atol=1e-4, rtol=1e-4)


def test_gpt_switch_cached_greedy_equals_recompute(gpt_switch):
    model, variables, apply, tokens = gpt_switch

    def next_logits(t):  # one compiled shape: right padding is invisible to a causal model (test above)
        padded = np.zeros(tokens.shape, np.int32)
        padded[:t.shape[0], :t.shape[1]] = t
        return np.asarray(apply(variables, jnp.asarray(padded)))[:t.shape[0], t.shape[1] - 1]

    prompt = tokens[:2, :5]
    want = reference.greedy(next_logits, np.asarray(prompt), 6)
    np.testing.assert_array_equal(ffl.generate(model, variables, prompt, 6), want)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_conditional_norm_matches_reference(kind):
    rng = np.random.default_rng(0)
    x, c = rng.standard_normal((2, 5, 16)) * 2 + 1, rng.standard_normal((2, 3))
    norm = make_norm(kind, epsilon=1e-5, condition_dim=3)
    variables = _perturb(norm.init(jax.random.key(0), jnp.zeros((2, 5, 16)), jnp.zeros((2, 3))))
    p = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
    got = norm.apply(variables, jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32))
    want = reference.conditional_norm(x, c, p["scale"], p["scale_kernel"], p.get("bias"), p.get("bias_kernel"))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    plain = make_norm(kind, epsilon=1e-5)  # no condition == the plain norm with the same scale (and bias)
    plain_vars = {"params": {k: v for k, v in variables["params"].items() if not k.endswith("_kernel")}}
    np.testing.assert_allclose(norm.apply(variables, jnp.asarray(x, jnp.float32)),
                               plain.apply(plain_vars, jnp.asarray(x, jnp.float32)), atol=1e-5, rtol=1e-5)


def test_conditional_gpt_condition_input():
    model = GPT(tiny_config(condition_dim=3))
    tokens = jnp.ones((2, 6), jnp.int32)
    variables = _perturb(model.init(jax.random.key(0), tokens), scale=0.05)
    c = jnp.asarray([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    logits, unconditioned = model.apply(variables, tokens, condition=c), model.apply(variables, tokens)
    np.testing.assert_allclose(logits[1], unconditioned[1], atol=1e-5)  # a zero condition == none
    assert not np.allclose(logits[0], unconditioned[0], atol=1e-3)
    with pytest.raises(ValueError, match="condition must be"):
        model.apply(variables, tokens, condition=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="condition_dim is 0"):
        GPT(tiny_config()).init(jax.random.key(0), tokens, condition=c)


def test_albert_sharing_equals_copied_weights():
    cfg = tiny_config("bert", table_dim=16, share_layers=True, num_layers=3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (2, 10)), jnp.int32)
    shared = BERT(cfg)
    variables = _perturb(shared.init(jax.random.key(0), tokens), scale=0.05)
    layer = variables["params"]["encoder"][SHARED_LAYER]
    unrolled_params = dict(variables["params"])
    unrolled_params["encoder"] = {layer_name(i): layer for i in range(3)}
    unrolled = BERT(dataclasses.replace(cfg, share_layers=False))
    got, want = shared.apply(variables, tokens), unrolled.apply({"params": unrolled_params}, tokens)
    np.testing.assert_allclose(got.mlm_logits, want.mlm_logits, atol=1e-5, rtol=1e-5)
    assert got.mlm_logits.shape == (2, 10, 97)
    assert variables["params"]["embedder"]["token"]["embedding"].value.shape == (97, 16)


def test_synthesizer_encoder_decoder_keeps_dot_product_cross_attention():
    model = EncoderDecoder(tiny_config("encoder_decoder", attention="synthesizer_dense"))
    src, tgt = jnp.ones((2, 7), jnp.int32), jnp.ones((2, 5), jnp.int32)
    params = model.init(jax.random.key(0), src, tgt)["params"]
    layer = params["decoder"]["layer_0"]
    assert "synthesizer" in layer["self_attention"] and "query" not in layer["self_attention"]
    assert "query" in layer["cross_attention"]
    assert model.apply({"params": params}, src, tgt).shape == (2, 5, 97)


@pytest.mark.parametrize("fields,match", [
    ({"attention": "linear", "talking_heads": True}, "talking_heads needs"),
    ({"model": "gpt", "table_dim": 32}, "table_dim"),
    ({"model": "encoder_decoder", "condition_dim": 4}, "condition_dim"),
    ({"condition_dim": -1}, "condition_dim"),
    ({"recurrent_gate": "data"}, "recurrent_gate='data' needs attention 'linear' or 'delta' and model 'gpt'"),
    ({"model": "bert", "attention": "delta"}, "attention='delta' is causal self-attention: model 'gpt'"),
    ({"attention": "delta", "sliding_window": 8}, "sliding_window needs attention='softmax'"),
    ({"model": "bert", "attention": "linear", "recurrent_gate": "fixed"}, "recurrent_gate='fixed' needs"),
    ({"attention": "linear", "recurrent_gate": "decay"}, r"recurrent_gate must be one of \['none', 'fixed', 'data'\]"),
])
def test_variant_config_errors(fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**fields)


def test_variant_layer_errors():
    x = jnp.zeros((1, 20, 16))
    with pytest.raises(ValueError, match="at most max_len=8"):
        MultiHeadAttention(num_heads=2, attention="synthesizer_random", max_len=8).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="self-attention only"):
        MultiHeadAttention(num_heads=2, attention="synthesizer_dense", max_len=32).init(jax.random.key(0), x, x)
    with pytest.raises(ValueError, match="needs max_len"):
        MultiHeadAttention(num_heads=2, attention="synthesizer_dense").init(jax.random.key(0), x)


def test_shared_layer_counts_once_per_depth_for_flops():
    from flaxformer_lite.training.metrics import count_params
    params = {"embedder": {"position": {"embedding": np.zeros((8, 4))}, "token": {"embedding": np.zeros((10, 4))}},
              "encoder": {SHARED_LAYER: {"w": np.zeros((4, 4))}}}
    assert count_params(params) == 32 + 40 + 16
    assert count_params(params, exclude_positions=True, shared_repeats=3) == 40 + 48
    assert count_params({"backbone": params, "classifier": {"b": np.zeros(2)}}, exclude_positions=True) == 40 + 16 + 2


def test_talking_heads_mixings_get_no_weight_decay():
    from flaxformer_lite.training.optimizer import decay_mask
    mask = decay_mask({"talking_heads": {"logits_mix": np.eye(2), "weights_mix": np.eye(2)},
                       "query": {"kernel": np.zeros((2, 2))}})
    assert mask == {"talking_heads": {"logits_mix": False, "weights_mix": False}, "query": {"kernel": True}}
