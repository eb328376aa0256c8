"""Decoding: cached greedy and beam search == recomputing the full forward pass at every step (tests/reference.py),
for GPT (softmax, linear, gated linear and Gated DeltaNet, GQA + rotary, scanned layers, ALBERT-style shared layers, prefix-LM prompts) and
EncoderDecoder, with beams that end at EOS; beam search against every hypothesis enumerated (a vocabulary of 8);
sampling, EOS, the constant-size linear state, and bad input."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxformer_lite as ffl
import reference
from cases import tiny_config
from flaxformer_lite.decoding import _init_cache, _Task, sample_logits
from flaxformer_lite.models import BERT, GPT, EncoderDecoder

GPT_VARIANTS = {
    "softmax": {},
    "linear": {"attention": "linear", "feature_map": "favor"},
    "linear_gated": {"attention": "linear", "recurrent_gate": "data", "num_kv_heads": 2},
    "delta_gated": {"attention": "delta", "recurrent_gate": "data", "num_kv_heads": 2},  # Gated DeltaNet
    "gqa_rotary": {"num_kv_heads": 2, "position": "rotary"},
    "scan_sinusoidal": {"scan_layers": True, "position": "sinusoidal"},
    "shared": {"share_layers": True},  # caches [layers, b, ...] under SHARED_LAYER: beams must reorder axis 1
}


def _prompt(b=2, l=5, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(3, 97, (b, l)), jnp.int32)


def _next_logits(apply_all, rows=3, length=16):
    """Recompute the next-token logits of t [B, L] with one compiled shape: pad t to [rows, length] (a causal model
    cannot see the padding, as the causality tests check) and read position L - 1."""
    def fn(t, *args):
        t = np.asarray(t)
        padded = np.zeros((rows, length), np.int32)
        padded[:t.shape[0], :t.shape[1]] = t
        return np.asarray(apply_all(jnp.asarray(padded), *args))[:t.shape[0], t.shape[1] - 1]
    return fn


@pytest.fixture(scope="module", params=sorted(GPT_VARIANTS))
def gpt(request):
    model = GPT(tiny_config(**GPT_VARIANTS[request.param]))
    variables = model.init(jax.random.key(0), _prompt())
    return model, variables, _next_logits(jax.jit(lambda t, p: model.apply(variables, t, prefix_lengths=p)))


@pytest.fixture(scope="module", params=["softmax", "linear"])
def seq2seq(request):
    model = EncoderDecoder(tiny_config("encoder_decoder", attention=request.param))
    src = _prompt(l=7, seed=1)
    variables = model.init(jax.random.key(0), src, src[:, :3])
    return model, variables, _next_logits(jax.jit(lambda t, s: model.apply(variables, s, t))), src


def test_gpt_greedy_equals_recompute(gpt):
    model, variables, apply = gpt
    prompt = _prompt()
    want = reference.greedy(lambda t: apply(t, None), np.asarray(prompt), 7)
    np.testing.assert_array_equal(ffl.generate(model, variables, prompt, 7), want)


def test_gpt_prefix_lm_prompt_equals_recompute(gpt):
    model, variables, apply = gpt
    prompt = _prompt()
    prefix = jnp.array([5, 5])
    if model.cfg.recurrent_gate != "none":  # a decay (or the delta rule) runs forward in time: no bidirectional prefix
        with pytest.raises(ValueError, match="without prefix_lengths"):
            ffl.generate(model, variables, prompt, 6, prefix_lengths=prefix)
        return
    want = reference.greedy(lambda t: apply(t, jnp.array([5, 5, 5])), np.asarray(prompt), 6)
    got = ffl.generate(model, variables, prompt, 6, prefix_lengths=prefix)
    np.testing.assert_array_equal(got, want)
    lists = ffl.generate(model, variables, prompt.tolist(), 6, prefix_lengths=[5, 5])  # array-likes: the same call
    np.testing.assert_array_equal(lists, want)


def _ended_early(seqs, eos, pad, new_tokens):
    """Whether some beam emitted ``eos`` before its last new token, and only ``pad`` after it."""
    beams = np.asarray(seqs)[..., -new_tokens:].reshape(-1, new_tokens)
    return any(eos in b[:-1] and (b[list(b).index(eos) + 1:] == pad).all() for b in beams)


def test_gpt_beam_search_equals_recompute(gpt):
    """EOS is the second greedy token of row 0, so beams finish early and are padded (reordering their caches and
    finished flags); an EOS that never occurs would leave all of that untested."""
    model, variables, apply = gpt
    prompt = _prompt()
    eos = int(reference.greedy(lambda t: apply(t, None), np.asarray(prompt), 2)[0, -1])
    seqs, scores = ffl.beam_search(model, variables, prompt, 4, beam_size=3, length_penalty=0.6, eos_id=eos)
    for row in range(2):
        want = reference.beam_search(lambda t: apply(t, None), list(np.asarray(prompt[row])), 4, 3, 0.6, eos, 0)
        np.testing.assert_array_equal(seqs[row], np.array([w[0] for w in want]))
        np.testing.assert_allclose(scores[row], [w[1] for w in want], rtol=1e-4, atol=1e-4)
    assert _ended_early(seqs, eos, model.cfg.pad_id, 4)


def test_seq2seq_greedy_and_beam_equal_recompute(seq2seq):
    model, variables, apply, src = seq2seq
    start = np.full((2, 1), model.cfg.bos_id)
    src3 = jnp.concatenate([src, src[:1]])  # the recompute runs 3 rows
    want = reference.greedy(lambda t: apply(t, src3), start, 6)
    np.testing.assert_array_equal(ffl.generate(model, variables, src, 6), want)
    eos = int(want[0, 2])  # the second greedy token of row 0: beams end early (see the GPT test)
    seqs, scores = ffl.beam_search(model, variables, src, 4, beam_size=3, eos_id=eos)
    for row in range(2):
        want = reference.beam_search(lambda t: apply(t, jnp.repeat(src[row:row + 1], 3, 0)), [model.cfg.bos_id],
                                     4, 3, 0.6, eos, 0)
        np.testing.assert_array_equal(seqs[row], np.array([w[0] for w in want]))
        np.testing.assert_allclose(scores[row], [w[1] for w in want], rtol=1e-4, atol=1e-4)
    assert _ended_early(seqs, eos, model.cfg.pad_id, 4)


@pytest.fixture(scope="module")
def gpt_softmax():
    model = GPT(tiny_config())
    variables = model.init(jax.random.key(0), _prompt())
    return model, variables, _next_logits(jax.jit(lambda t, p: model.apply(variables, t, prefix_lengths=p)))


def test_beam_of_one_is_greedy(gpt_softmax):
    model, variables, _ = gpt_softmax
    prompt = _prompt()
    seqs, _ = ffl.beam_search(model, variables, prompt, 5, beam_size=1, length_penalty=0.0)
    np.testing.assert_array_equal(seqs[:, 0], ffl.generate(model, variables, prompt, 5))


def test_eos_stops_rows_and_pads(gpt_softmax):
    model, variables, _ = gpt_softmax
    prompt = _prompt()
    free = np.asarray(ffl.generate(model, variables, prompt, 8))
    eos = int(free[0, 5 + 2])  # the third new token of row 0 becomes EOS
    out = np.asarray(ffl.generate(model, variables, prompt, 8, eos_id=eos))
    for row in range(2):
        new = list(free[row, 5:])
        stop = new.index(eos) if eos in new else None
        if stop is None:
            np.testing.assert_array_equal(out[row], free[row])
        else:
            np.testing.assert_array_equal(out[row, :5 + stop + 1], free[row, :5 + stop + 1])
            assert (out[row, 5 + stop + 1:] == model.cfg.pad_id).all()


def test_beam_search_with_eos_equals_brute_force():
    """EOS inside the beams, against every hypothesis enumerated: a vocabulary of 8, 3 new tokens, beam_size 8.

    With beam_size = vocab_size the first step keeps every token, so the beams after step 2 are the 8 best of all
    two-token hypotheses and the final beams the 8 best of their extensions (scores: sums of float64 log-probs
    of the model's logits, a hypothesis that emitted EOS carried on with pad at no cost); they are then ranked by
    score / ((5 + length) / 6) ** 0.6, length counting up to and including EOS. EOS is the model's greedy first
    token of row 0, so the best beams finish at once and are padded, others later or never."""
    vocab, p, n, alpha = 8, 4, 3, 0.6
    model = GPT(tiny_config(vocab_size=vocab))
    prompt = _prompt(l=p) % (vocab - 3) + 3
    variables = model.init(jax.random.key(0), prompt)
    pad = model.cfg.pad_id
    # every 2-token continuation of each row, run once: position p - 1 + j gives the log-probs after j new tokens
    heads = list(itertools.product(range(vocab), repeat=n - 1))
    rows = np.concatenate([np.concatenate([np.repeat(np.asarray(prompt[r:r + 1]), len(heads), 0), heads], 1)
                           for r in range(2)])
    logp = reference.log_softmax(model.apply(variables, jnp.asarray(rows, jnp.int32))[:, p - 1:])
    eos = int(np.argmax(logp[0, 0]))
    assert eos != pad

    def hypotheses(row, steps):
        """{tokens: (score, length)} of every distinct hypothesis of ``steps`` (2 or 3) new tokens."""
        table = logp[row * len(heads):(row + 1) * len(heads)]
        out = {}
        for seq in itertools.product(range(vocab), repeat=steps):
            stop = seq.index(eos) + 1 if eos in seq else steps
            if any(t != pad for t in seq[stop:]):
                continue  # after EOS only pad
            lp = table[heads.index(seq[:n - 1])]  # the log-probs along its first two tokens
            out[seq] = (sum(lp[j, seq[j]] for j in range(stop)), stop)
        return out

    def best(scored, k):
        """The ``k`` best of {hypothesis: score}, best first; the float32 beams cannot tie where these differ."""
        ranked = sorted(scored, key=lambda s: -scored[s])
        gaps = np.diff([scored[s] for s in ranked[:k + 1]])
        assert (gaps < -1e-4).all(), gaps
        return ranked[:k]

    seqs, scores = ffl.beam_search(model, variables, prompt, n, beam_size=vocab, length_penalty=alpha, eos_id=eos)
    seqs, scores = np.asarray(seqs), np.asarray(scores)
    lengths = set()
    for row in range(2):
        kept = best({s: v[0] for s, v in hypotheses(row, 2).items()}, vocab)  # the beams after step 2
        three = {s: v for s, v in hypotheses(row, 3).items() if s[:2] in kept}
        beams = best({s: v[0] for s, v in three.items()}, vocab)
        normalised = {s: three[s][0] / ((5.0 + three[s][1]) / 6.0) ** alpha for s in beams}
        final = best(normalised, vocab)
        np.testing.assert_array_equal(seqs[row, :, :p], np.broadcast_to(prompt[row], (vocab, p)))
        np.testing.assert_array_equal(seqs[row, :, p:], final)
        np.testing.assert_allclose(scores[row], [normalised[s] for s in final], rtol=1e-5, atol=1e-5)
        lengths |= {three[s][1] for s in final}
    assert lengths == {1, 2, 3}, lengths  # beams that finished at each step, and ones that never did


def test_sampling(gpt_softmax):
    model, variables, apply = gpt_softmax
    prompt = _prompt()
    greedy = ffl.generate(model, variables, prompt, 5)
    key = jax.random.key(3)
    np.testing.assert_array_equal(ffl.generate(model, variables, prompt, 5, temperature=1.0, top_k=1, rng=key), greedy)
    np.testing.assert_array_equal(ffl.generate(model, variables, prompt, 5, temperature=1.0, top_p=1e-6, rng=key),
                                  greedy)
    a = ffl.generate(model, variables, prompt, 5, temperature=2.0, rng=key)
    np.testing.assert_array_equal(a, ffl.generate(model, variables, prompt, 5, temperature=2.0, rng=key))
    assert not np.array_equal(a, ffl.generate(model, variables, prompt, 5, temperature=2.0, rng=jax.random.key(4)))
    first = ffl.generate(model, variables, jnp.repeat(prompt[:1], 64, 0), 1, temperature=1.0, top_k=5, rng=key)
    top5 = set(np.argsort(-apply(prompt[:1], None)[0])[:5])
    assert set(np.asarray(first[:, -1])) <= top5


def test_non_finite_logits_raise(gpt_softmax):
    """NaN parameters used to give NaN logits and token 0 forever; both loops now say so (one check after the loop).
    The calls match test_sampling's and test_beam_of_one_is_greedy's: no new compile."""
    model, variables, _ = gpt_softmax
    all_nan = jax.tree_util.tree_map(lambda x: x * jnp.nan, variables)
    with pytest.raises(ValueError, match=r"logits are not finite \(NaN or inf\) at new token 1 of 5; check the"):
        ffl.generate(model, all_nan, _prompt(), 5)
    # A NaN position embedding at 5 (the first generated token's position; the prompt holds 0..4): step 2 goes bad.
    late = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[5].set(jnp.nan) if "position" in [getattr(k, "key", None) for k in path] else x,
        variables)
    with pytest.raises(ValueError, match="logits are not finite .* at new token 2 of 5"):
        ffl.generate(model, late, _prompt(), 5)
    with pytest.raises(ValueError, match="logits are not finite .* at new token 2 of 5"):
        ffl.beam_search(model, late, _prompt(), 5, beam_size=1, length_penalty=0.0)


def test_variables_of_another_model_raise(gpt_softmax):
    """Params that do not fit the model fail in one line naming the first parameter, when the loop is traced."""
    model, variables, _ = gpt_softmax
    gqa = GPT(tiny_config(num_kv_heads=2))
    other = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                   jax.eval_shape(gqa.init, jax.random.key(0), _prompt()))
    shape = (r"do not fit this GPT: decoder/layer_0/self_attention/key/bias should have shape \(4, 16\), "
             r"found shape \(2, 16\)")
    with pytest.raises(ValueError, match=shape):
        ffl.generate(model, other, _prompt(), 5)
    with pytest.raises(ValueError, match=shape):
        ffl.beam_search(model, other, _prompt(), 5, beam_size=1, length_penalty=0.0)
    params = nn.unbox(variables["params"])
    missing = {"params": {k: v for k, v in params.items() if k != "final_norm"}}
    with pytest.raises(ValueError, match=r"final_norm/bias should have shape \(64,\), found no such parameter"):
        ffl.generate(model, missing, _prompt(), 5)
    extra = {"params": {**params, "head": {"kernel": jnp.zeros((64, 97))}}}
    with pytest.raises(ValueError, match=r"it has no head/kernel \(found shape \(64, 97\); another model's"):
        ffl.generate(model, extra, _prompt(), 5)


def test_sample_logits_nucleus_and_top_k():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    rngs = jax.random.split(jax.random.key(0), 400)
    draw = lambda **kw: np.array([int(sample_logits(logits, r, 1.0, **kw)[0]) for r in rngs[:200]])
    assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, then 0.8 >= 0.7: the nucleus is the first two
    assert set(draw(top_k=3)) == {0, 1, 2}
    counts = np.bincount(draw(), minlength=4) / 200
    assert abs(counts[0] - 0.5) < 0.1 and counts[3] < 0.12


def test_linear_decode_state_does_not_grow():
    """Linear attention caches a recurrent state: its size does not depend on how long the sequence gets."""
    model = GPT(tiny_config(attention="linear"))
    params = model.init(jax.random.key(0), _prompt())["params"]
    cache_size = lambda m, n: sum(x.size for x in jax.tree_util.tree_leaves(
        _init_cache(_Task(m, n), params, _prompt(), 5 + n, 2)))
    sizes = {n: cache_size(model, n) for n in (8, 40)}
    assert sizes[8] == sizes[40]
    softmax = GPT(tiny_config())
    grow = [cache_size(softmax, n) for n in (8, 40)]
    assert grow[1] > grow[0]


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt=jnp.zeros((5,), jnp.int32)), "prompt must be int"),
    (dict(prompt=jnp.array([[1, 99]], jnp.int32)), r"prompt must be ids in \[0, vocab_size=97\); got \[99\]"),
    (dict(prompt=jnp.array([[-1, 4]], jnp.int32)), r"got \[-1\] among its values"),
    (dict(prompt=jnp.zeros((2, 0), jnp.int32)), "at least one token"),
    (dict(variables={"cache": {}}), "variables must be"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=44), "> max_len 48"),
    (dict(prefix_lengths=jnp.array([1, 2, 3])), "prefix_lengths"),
    (dict(prefix_lengths=[7, 7]), r"prefix_lengths must be in \[0, 5\] \(the prompt length\); got \[7, 7\]"),
    (dict(prefix_lengths=[-1, 2]), r"prefix_lengths must be in \[0, 5\]"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=1.0), "needs rng"),
    (dict(top_k=0, temperature=1.0, rng=jax.random.key(0)), "top_k"),
    (dict(top_k=98, temperature=1.0, rng=jax.random.key(0)), r"top_k must be an int in \[1, vocab_size = 97\]"),
    (dict(top_p=1.5, temperature=1.0, rng=jax.random.key(0)), "top_p"),
    (dict(temperature=None), "temperature must be a finite number >= 0, got None"),
    (dict(temperature="1"), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(temperature=float("inf"), rng=jax.random.key(0)), "temperature must be a finite number >= 0, got inf"),
    (dict(top_p=float("nan"), temperature=1.0, rng=jax.random.key(0)), "top_p"),
    (dict(temperature=1.0, rng=0), r"rng must be a PRNG key from jax.random.key\(seed\) .*, got int 0"),
    (dict(eos_id=[2, 3]), r"eos_id must be an int in \[0, vocab_size = 97\) or None, got \[2, 3\]"),
    (dict(eos_id=500), "eos_id must be an int in"),
])
def test_generate_bad_input(gpt_softmax, kwargs, match):
    model, variables, _ = gpt_softmax
    args = dict(variables=variables, prompt=_prompt(), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ffl.generate(model, args.pop("variables"), args.pop("prompt"), args.pop("max_new_tokens"), **args)


def test_beam_and_model_kind_errors():
    model = GPT(tiny_config())
    variables = model.init(jax.random.key(0), _prompt())
    with pytest.raises(ValueError, match="beam_size"):
        ffl.beam_search(model, variables, _prompt(), 3, beam_size=0)
    with pytest.raises(ValueError, match=r"length_penalty must be a finite number \(0: none\), got None"):
        ffl.beam_search(model, variables, _prompt(), 3, beam_size=2, length_penalty=None)
    with pytest.raises(ValueError, match=r"length_penalty must be a finite number \(0: none\), got nan"):
        ffl.beam_search(model, variables, _prompt(), 3, beam_size=2, length_penalty=float("nan"))
    with pytest.raises(ValueError, match="beam_size must be an int"):
        ffl.beam_search(model, variables, _prompt(), 3, beam_size=True)
    with pytest.raises(ValueError, match="eos_id must be an int"):
        ffl.beam_search(model, variables, _prompt(), 3, beam_size=2, eos_id=-1)
    bert = BERT(tiny_config("bert"))
    with pytest.raises(ValueError, match="GPT or EncoderDecoder"):
        ffl.generate(bert, bert.init(jax.random.key(0), _prompt()), _prompt(), 3)
