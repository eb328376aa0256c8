"""Models: published parameter counts, logical names on every param, causality, prefix-LM, packing, BERT padding,
fine-tuning heads, bad input, and a tiny model of each kind overfitting one batch."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import reference
from cases import tiny_config
from flaxformer_lite.layers import SCANNED_LAYERS
from flaxformer_lite.models import (BERT, GPT, EncoderDecoder, MultipleChoice, SequenceClassifier, TokenClassifier,
                                    build, list_presets, preset)

BERT_HEADS = ("mlm_transform", "mlm_norm", "mlm_bias", "nsp")
# Hugging Face's counts: GPT2LMHeadModel (tied), BertModel (with pooler) and BertForPreTraining.
PUBLISHED = {"gpt2-small": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
             "gpt2-xl": 1_557_611_200, "bert-base": 109_482_240, "bert-large": 335_141_888, "bert-tiny": 4_385_920,
             "albert-base": 11_683_584, "albert-large": 17_683_968}  # AlbertModel (v2), with pooler
PUBLISHED_WITH_HEADS = {"bert-base": 110_106_428}


def _tokens(b=2, l=12, seed=0, vocab=97):
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, (b, l)), jnp.int32)


def _param_shapes(model, *args):
    return nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"])


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    cfg = preset(name)
    params = _param_shapes(build(cfg), jnp.zeros((1, 8), jnp.int32))
    without_heads = {k: v for k, v in params.items() if k not in BERT_HEADS}
    assert _count(without_heads) == PUBLISHED[name]
    if name in PUBLISHED_WITH_HEADS:
        assert _count(params) == PUBLISHED_WITH_HEADS[name]


@pytest.mark.parametrize("name", ["transformer-base", "transformer-big", "transformer-tiny"])
def test_encoder_decoder_counts_match_formula(name):
    cfg = preset(name)
    toks = jnp.zeros((1, 8), jnp.int32)
    want = reference.encoder_decoder_params(cfg.vocab_size, cfg.embed_dim, cfg.mlp_dim, cfg.embed_dim,
                                            cfg.num_layers, cfg.decoder_layers)
    assert _count(_param_shapes(EncoderDecoder(cfg), toks, toks)) == want


def test_presets_listed_and_unknown_raises():
    assert {"gpt2-small", "gpt-tiny", "bert-base", "bert-tiny", "transformer-base", "transformer-tiny"} <= \
        set(list_presets())
    with pytest.raises(ValueError, match="unknown preset.*gpt2-small"):
        preset("gpt5")


@pytest.mark.parametrize("kind,scan", [("gpt", False), ("gpt", True), ("bert", False), ("encoder_decoder", True)])
def test_every_param_has_logical_names(kind, scan):
    cfg = tiny_config(kind, scan_layers=scan)
    toks = _tokens()
    args = (toks, toks) if kind == "encoder_decoder" else (toks,)
    boxed = jax.eval_shape(lambda: build(cfg).init(jax.random.key(0), *args))["params"]
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(p, nn.LogicallyPartitioned) and len(p.names) == p.value.ndim for p in leaves)
    if scan:
        assert any(p.names[0] == SCANNED_LAYERS for p in leaves)


@pytest.fixture(scope="module", params=["softmax", "linear"])
def gpt(request):
    cfg = tiny_config(attention=request.param, feature_map="favor")
    model = GPT(cfg)
    return model, model.init(jax.random.key(0), _tokens()), jax.jit(model.apply)


def test_gpt_is_causal(gpt):
    model, variables, apply = gpt
    toks = _tokens()
    changed = toks.at[:, 7:].set(_tokens(seed=1)[:, 7:])
    a, b = apply(variables, toks), apply(variables, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], rtol=0, atol=1e-5)
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_gpt_prefix_lm(gpt):
    model, variables, apply = gpt
    toks, prefix = _tokens(), jnp.array([5, 5])
    run = lambda t: apply(variables, t, prefix_lengths=prefix)
    base = run(toks)
    inside = run(toks.at[:, 4].set(7))  # a prefix token: earlier prefix rows see it
    assert not np.allclose(base[:, :4], inside[:, :4])
    after = run(toks.at[:, 8].set(7))  # after the prefix: causal
    np.testing.assert_allclose(after[:, :8], base[:, :8], rtol=0, atol=1e-5)
    assert not np.allclose(base, apply(variables, toks)[:, :])  # differs from the plain causal model


def test_gpt_packing_equals_separate_documents(gpt):
    model, variables, apply = gpt
    toks = _tokens(1, 12)
    seg = jnp.array([[0] * 5 + [1] * 7])
    packed = apply(variables, toks, segment_ids=seg)
    np.testing.assert_allclose(packed[:, :5], apply(variables, toks[:, :5]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, 5:], apply(variables, toks[:, 5:]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_encoder_decoder_decoder_is_causal(attention):
    model = EncoderDecoder(tiny_config("encoder_decoder", attention=attention))
    src, tgt = _tokens(l=9), _tokens(l=10, seed=2)
    variables = model.init(jax.random.key(0), src, tgt)
    a = model.apply(variables, src, tgt)
    b = model.apply(variables, src, tgt.at[:, 6:].set(5))
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=0, atol=1e-5)
    c = model.apply(variables, src.at[:, -1].set(5), tgt)
    assert not np.allclose(a[:, 0], c[:, 0])  # every target position sees the whole source
    pad = jnp.arange(9)[None] < jnp.array([[9], [5]])
    d = model.apply(variables, src, tgt, src_padding_mask=pad)
    e = model.apply(variables, src.at[1, 5:].set(7), tgt, src_padding_mask=pad)
    np.testing.assert_allclose(d, e, rtol=0, atol=1e-5)  # padded source tokens change nothing


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_bert_padding_invariance_and_outputs(attention):
    cfg = tiny_config("bert", attention=attention)
    model = BERT(cfg)
    toks = _tokens()
    pad = jnp.arange(12)[None] < jnp.array([[12], [7]])
    types = (jnp.arange(12)[None] >= 4).astype(jnp.int32).repeat(2, 0)
    variables = model.init(jax.random.key(0), toks, padding_mask=pad)
    out = model.apply(variables, toks, token_type_ids=types, padding_mask=pad)
    assert out.hidden.shape == (2, 12, 64) and out.pooled.shape == (2, 64)
    assert out.mlm_logits.shape == (2, 12, 97) and out.nsp_logits.shape == (2, 2)
    out2 = model.apply(variables, toks.at[1, 7:].set(3), token_type_ids=types, padding_mask=pad)
    np.testing.assert_allclose(out2.hidden[1, :7], out.hidden[1, :7], rtol=0, atol=1e-5)
    np.testing.assert_allclose(out2.pooled, out.pooled, rtol=0, atol=1e-5)
    assert not np.allclose(model.apply(variables, toks, padding_mask=pad).hidden, out.hidden)  # types matter


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_classification_heads(kind):
    cfg = tiny_config(kind)
    toks = _tokens()
    pad = jnp.arange(12)[None] < jnp.array([[12], [8]])
    clf = SequenceClassifier(cfg, num_labels=3)
    v = clf.init(jax.random.key(0), toks, padding_mask=pad)
    assert "backbone" in v["params"]
    logits = clf.apply(v, toks, padding_mask=pad)
    assert logits.shape == (2, 3)
    np.testing.assert_allclose(clf.apply(v, toks.at[1, 8:].set(4), padding_mask=pad), logits, rtol=0, atol=1e-5)
    mc = MultipleChoice(cfg)
    choices = _tokens(6, 12).reshape(2, 3, 12)
    assert mc.apply(mc.init(jax.random.key(0), choices), choices).shape == (2, 3)


def test_token_classifier():
    tc = TokenClassifier(tiny_config("bert"), num_labels=5)
    toks = _tokens()
    assert tc.apply(tc.init(jax.random.key(0), toks), toks).shape == (2, 12, 5)
    with pytest.raises(ValueError, match="BERT config"):
        TokenClassifier(tiny_config("gpt"), num_labels=5).init(jax.random.key(0), toks)


def test_bfloat16_compute():
    model = GPT(tiny_config(dtype="bfloat16"))
    variables = model.init(jax.random.key(0), _tokens())
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(nn.unbox(variables)))
    logits = model.apply(variables, _tokens())
    assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize("tokens,match", [
    (np.zeros((2, 49), np.int32), "length 49 > max_len 48"),
    (np.full((2, 4), 97, np.int32), r"must be ids in \[0, vocab_size=97\); got \[97, 97, 97\]"),
    (np.full((2, 4), -1, np.int32), r"got \[-1, -1, -1\] among its values"),
    (np.zeros((4,), np.int32), r"int \[batch, length\]"),
    (np.zeros((2, 4), np.float32), "integer token ids"),
])
def test_bad_tokens_raise(tokens, match):
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.key(0), jnp.asarray(tokens))


def _ids(shape, value=0):
    return jnp.full(shape, value, jnp.int32)


@pytest.mark.parametrize("make,kwargs,match", [
    (lambda: GPT(tiny_config()), dict(segment_ids=_ids((2, 5))), "segment_ids must have the shape"),
    (lambda: GPT(tiny_config()), dict(positions=_ids((2, 11))), r"positions must have the shape of its tokens \(2, 12"),
    (lambda: GPT(tiny_config()), dict(positions=_ids((2, 12), 48)),
     r"positions must be ids in \[0, max_len=48\); got \[48"),
    (lambda: BERT(tiny_config("bert")), dict(token_type_ids=_ids((2, 12), 2)),
     r"token_type_ids must be ids in \[0, type_vocab_size=2\)"),
    (lambda: BERT(tiny_config("bert", type_vocab_size=0)), dict(token_type_ids=_ids((2, 12))), "type_vocab_size is 0"),
    (lambda: SequenceClassifier(tiny_config(), num_labels=2), dict(padding_mask=jnp.ones((2, 14), bool)),
     r"padding_mask must have the shape of its tokens \(2, 12\)"),
])
def test_bad_structure_raises(make, kwargs, match):
    """Per-token inputs are checked against the tokens (shape) and the config (table sizes) before any compute."""
    with pytest.raises(ValueError, match=match):
        make().init(jax.random.key(0), _tokens(), **kwargs)


@pytest.mark.parametrize("overrides,match", [
    (dict(embed_dim=50, num_heads=4), "embed_dim .* divisible by num_heads"),
    (dict(num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(activation="tanhh"), "activation must be one of"),
    (dict(position="alibi"), "position must be one of"),
    (dict(attention="sparse"), "attention must be one of"),
    (dict(norm_position="middle"), "norm_position must be one of"),
    (dict(dropout_rate=1.0), r"dropout_rate must be a number in \[0, 1\)"),
    (dict(num_layers=0), "num_layers must be a positive int"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(num_kv_heads=-2), "num_kv_heads must be a positive int or None"),
    (dict(num_kv_heads=0), "num_kv_heads must be a positive int or None"),
    (dict(head_dim=0), "head_dim must be a positive int or None"),
    (dict(num_decoder_layers=-1), "num_decoder_layers must be a positive int or None"),
    (dict(type_vocab_size=-1), "type_vocab_size must be an int >= 0"),
    (dict(vocab_size=True), "vocab_size must be a positive int"),
    (dict(norm_epsilon=0.0), "norm_epsilon must be a finite number > 0"),
    (dict(init_std=-0.02), "init_std must be a finite number > 0"),
    (dict(rope_base=0.0), "rope_base must be a finite number > 1"),
    (dict(dropout_rate="0.1"), "dropout_rate must be a number in"),
    (dict(eos_id=97), r"eos_id must be an int in \[0, vocab_size=97\)"),
    (dict(pad_id=-1), "pad_id must be an int in"),
    (dict(use_bias="no"), "use_bias must be a bool"),
])
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(tiny_config(), **overrides)


def _overfit(loss_fn, params, steps=150, lr=3e-3):
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    first = None
    for _ in range(steps):
        params, state, loss = step(params, state)
        first = float(loss) if first is None else first
    return first, float(loss)


def _xent(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


@pytest.mark.parametrize("kind,attention", [("gpt", "softmax"), ("gpt", "linear"), ("gpt", "linear_gated"),
                                            ("gpt", "delta_gated"), ("bert", "softmax"), ("encoder_decoder", "softmax")])
def test_tiny_model_overfits_one_batch(kind, attention):
    gated = attention.endswith("_gated")  # a data-dependent decay (GLA, Gated DeltaNet): gradients reach the gate
    cfg = tiny_config(kind, attention=attention.removesuffix("_gated"), recurrent_gate="data" if gated else "none")
    model = build(cfg)
    toks = _tokens(4, 16)
    if kind == "gpt":
        params = model.init(jax.random.key(0), toks)["params"]
        loss = lambda p: _xent(model.apply({"params": p}, toks[:, :-1]), toks[:, 1:])
    elif kind == "bert":
        masked = toks.at[:, ::3].set(4)  # predict every third token from its context
        params = model.init(jax.random.key(0), masked)["params"]
        loss = lambda p: _xent(model.apply({"params": p}, masked).mlm_logits[:, ::3], toks[:, ::3])
    else:
        src, tgt = toks, jnp.flip(toks, 1)  # learn to reverse
        tgt_in = jnp.concatenate([jnp.ones((4, 1), jnp.int32), tgt[:, :-1]], 1)
        params = model.init(jax.random.key(0), src, tgt_in)["params"]
        loss = lambda p: _xent(model.apply({"params": p}, src, tgt_in), tgt)
    first, last = _overfit(loss, params)
    assert first > 3.0 and last < 0.3, (first, last)
