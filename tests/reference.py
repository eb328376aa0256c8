"""Independent float64 NumPy references. Written from the papers' definitions, not from the package's code.

Shapes: q [b, lq, h, d], k [b, lk, n, d], v [b, lk, n, dv]; dense masks [b, lq, lk] bool (True = attend).
"""
from __future__ import annotations

import numpy as np
import pytest


def dense_mask(b, lq, lk, *, causal=False, prefix_lengths=None, kv_lengths=None, kv_valid=None,
               q_segment_ids=None, kv_segment_ids=None, q_offset=0, window=None):
    """The mask each Mask field describes, built entry by entry: bool [b, lq, lk]. ``window``: query i (at position
    i + q_offset) sees only the ``window`` most recent positions up to its own, as Mistral's sliding window in
    Hugging Face transformers (``kv_idx > q_idx - sliding_window``)."""
    out = np.ones((b, lq, lk), bool)
    off = np.broadcast_to(np.asarray(q_offset), (b,))
    for bi in range(b):
        for i in range(lq):
            for j in range(lk):
                ok = True
                if causal or prefix_lengths is not None:
                    ok &= j <= i + off[bi] or (prefix_lengths is not None and j < prefix_lengths[bi])
                if window is not None:
                    ok &= j > i + off[bi] - window
                if kv_lengths is not None:
                    ok &= j < kv_lengths[bi]
                if kv_valid is not None:
                    ok &= bool(kv_valid[bi, j])
                if q_segment_ids is not None:
                    ok &= q_segment_ids[bi, i] == kv_segment_ids[bi, j]
                out[bi, i, j] = ok
    return out


def _expand_kv(x, heads):
    """[b, l, n, d] -> [b, l, h, d]: query head i reads kv head i // (h // n)."""
    return np.repeat(x, heads // x.shape[2], axis=2)


def softmax_attention(q, k, v, mask=None, bias=None, scale=None, keep=None, rate=0.0):
    """softmax(scale q.k + bias) v over visible keys; rows with no visible key give 0.

    keep: optional bool [b, h, lq, lk] dropout keep mask (probabilities scaled by 1/(1-rate))."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, lq, h, d = q.shape
    k, v = _expand_kv(k, h), _expand_kv(v, h)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    return attend_logits(logits, v, mask, keep=keep, rate=rate)


def attend_logits(logits, v, mask=None, head_mix=None, keep=None, rate=0.0):
    """softmax over the visible keys of logits [b, h, lq, lk] (rows with none give 0), optionally mixed across heads
    (P'[h'] = sum_h P[h] head_mix[h, h']), then applied to v [b, lk, n, dv] -> [b, lq, h, dv]."""
    logits = np.asarray(logits, np.float64)
    v = _expand_kv(np.asarray(v, np.float64), logits.shape[1])
    m = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask)[:, None], logits.shape)
    logits = np.where(m, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.where(m, np.exp(logits - row_max), 0.0)
    total = p.sum(-1, keepdims=True)
    probs = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
    if head_mix is not None:
        probs = np.einsum("bhqk,hj->bjqk", probs, np.asarray(head_mix, np.float64))
    if keep is not None:
        probs = probs * np.asarray(keep) / (1.0 - rate)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def _dense(x, p):
    """x [..., e] through a Flax DenseGeneral's kernel [e, *out] and bias [*out]."""
    kernel = np.asarray(p["kernel"], np.float64)
    out = np.tensordot(np.asarray(x, np.float64), kernel, axes=1)
    return out + np.asarray(p["bias"], np.float64) if "bias" in p else out


def variant_logits(params, x, kind, talking_heads=False):
    """Logits [b, h, l, l] of one of the attention variants from the papers' equations, given a MultiHeadAttention's
    params, and the post-softmax head mixing (talking heads) or None: additive (Bahdanau et al. 2015:
    s_ij = w . tanh(W_q x_i + W_k x_j)), synthesizer_dense (Tay et al. 2021: s_i = W2 relu(W1 x_i + b1) + b2 over
    key positions), synthesizer_random (s = R, a table), softmax with talking heads (Shazeer et al. 2020: logits
    mixed across heads, weights mixed after the softmax)."""
    f = lambda a: np.asarray(a, np.float64)
    b, l, _ = x.shape
    if kind == "additive":
        q = _dense(x, params["query"])
        k = _expand_kv(_dense(x, params["key"]), q.shape[2])
        return np.einsum("bqkhd,hd->bhqk", np.tanh(q[:, :, None] + k[:, None]), f(params["additive"]["energy"])), None
    if kind == "synthesizer_dense":
        hidden = np.maximum(_dense(x, params["synthesizer"]["hidden"]), 0.0)
        s = np.einsum("bqhd,hdk->bhqk", hidden, f(params["synthesizer"]["scores_kernel"])[:, :, :l])
        return s + f(params["synthesizer"]["scores_bias"])[None, :, None, :l], None
    if kind == "synthesizer_random":
        table = f(params["synthesizer"]["random_scores"])
        return np.broadcast_to(table[:, :l, :l][None], (b, table.shape[0], l, l)), None
    q, k = _dense(x, params["query"]), _dense(x, params["key"])
    s = np.einsum("bqhd,bkhd->bhqk", q, _expand_kv(k, q.shape[2])) / np.sqrt(q.shape[-1])
    if not talking_heads:
        return s, None
    mixed = np.einsum("bhqk,hj->bjqk", s, f(params["talking_heads"]["logits_mix"]))
    return mixed, params["talking_heads"]["weights_mix"]


def attention_variant(params, x, kind, mask=None, talking_heads=False):
    """Self-attention x [b, l, e] -> [b, l, e] of a variant (see `variant_logits`) through the out projection."""
    s, head_mix = variant_logits(params, x, kind, talking_heads)
    out = attend_logits(s, _dense(x, params["value"]), mask, head_mix)
    return np.einsum("bqhd,hde->bqe", out, np.asarray(params["out"]["kernel"], np.float64)) + \
        np.asarray(params["out"]["bias"], np.float64)


def attention_weights(logits, mask=None, head_mix=None):
    """The weights [b, h, lq, lk] that `attend_logits` applies: attend over one-hot values."""
    b, h, lq, lk = np.shape(logits)
    eye = np.broadcast_to(np.eye(lk)[None, :, None, :], (b, lk, h, lk))
    return np.moveaxis(attend_logits(logits, eye, mask, head_mix), 2, 1)


def conditional_norm(x, condition, scale, scale_kernel, bias=None, bias_kernel=None, eps=1e-5):
    """Conditional layer norm (bias given) or RMS norm: normalise(x) * (scale + c W_s) + (bias + c W_b) per example;
    x [b, l, e], condition [b, c]."""
    x, c = np.asarray(x, np.float64), np.asarray(condition, np.float64)
    gain = (np.asarray(scale, np.float64) + c @ np.asarray(scale_kernel, np.float64))[:, None]
    if bias is None:
        return rms_norm(x, 1.0, eps) * gain
    shift = (np.asarray(bias, np.float64) + c @ np.asarray(bias_kernel, np.float64))[:, None]
    return layer_norm(x, 1.0, 0.0, eps) * gain + shift


def elu_plus_one(x):
    """elu(x) + 1, float64."""
    x = np.asarray(x, np.float64)
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def relu(x):
    """max(x, 0), float64."""
    return np.maximum(np.asarray(x, np.float64), 0.0)


def favor(x, w):
    """FAVOR+ positive random features (Choromanski et al. 2021, Lemma 1) for exp(x.y / sqrt(d)):
    phi(x) = exp(W x' - |x'|^2/2) / sqrt(m), x' = x / d^(1/4); w [m, d]."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    xs = x / x.shape[-1] ** 0.25
    return np.exp(xs @ w.T - 0.5 * (xs * xs).sum(-1, keepdims=True)) / np.sqrt(w.shape[0])


def linear_attention(q, k, v, mask=None, phi=elu_plus_one):
    """sum_j m_ij phi(q_i).phi(k_j) v_j / sum_j m_ij phi(q_i).phi(k_j) (Katharopoulos et al. 2020); 0 if empty."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    h = q.shape[2]
    fq, fk = phi(q), phi(_expand_kv(k, h))
    w = np.einsum("bqhf,bkhf->bhqk", fq, fk)
    if mask is not None:
        w = w * np.asarray(mask)[:, None]
    num = np.einsum("bhqk,bkhd->bqhd", w, _expand_kv(v, h))
    den = w.sum(-1).transpose(0, 2, 1)[..., None]
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def gated_linear_attention(q, k, v, log_decay, segment_ids=None, kv_valid=None, phi=elu_plus_one):
    """Causal gated linear attention by its recurrence, one position at a time (RetNet, GLA, Mamba-2's scalar gate):
    ``S_t = exp(log_decay_t) S_{t-1} + phi(k_t) v_t^T``, ``z_t = exp(log_decay_t) z_{t-1} + phi(k_t)``,
    ``out_t = phi(q_t) S_t / phi(q_t) z_t`` (0 if that is 0). ``log_decay [b, l, n]`` per kv head. The state restarts
    (is zeroed) where ``segment_ids [b, l]`` changes; where ``kv_valid [b, l]`` is False the position neither decays
    nor adds to the state (its query still reads it)."""
    q, k, v, log_decay = (np.asarray(x, np.float64) for x in (q, k, v, log_decay))
    b, l, h, _ = q.shape
    n, g = k.shape[2], h // k.shape[2]
    fq, fk = phi(q), phi(k)
    out = np.zeros((b, l, h, v.shape[-1]))
    for bi in range(b):
        state = np.zeros((n, fk.shape[-1], v.shape[-1]))
        norm = np.zeros((n, fk.shape[-1]))
        for t in range(l):
            if segment_ids is not None and t > 0 and segment_ids[bi, t] != segment_ids[bi, t - 1]:
                state, norm = np.zeros_like(state), np.zeros_like(norm)
            if kv_valid is None or kv_valid[bi, t]:
                decay = np.exp(log_decay[bi, t])  # [n]
                state = decay[:, None, None] * state + np.einsum("nf,nv->nfv", fk[bi, t], v[bi, t])
                norm = decay[:, None] * norm + fk[bi, t]
            for head in range(h):
                num, den = fq[bi, t, head] @ state[head // g], fq[bi, t, head] @ norm[head // g]
                out[bi, t, head] = num / den if den > 0 else 0.0
    return out


def delta_rule_attention(q, k, v, beta, log_decay=None, segment_ids=None, kv_valid=None, return_state=False):
    """Causal (gated) delta rule by its recurrence, one position at a time (DeltaNet, Yang et al. 2024; Gated DeltaNet):
    with q and k scaled to unit L2 norm, ``S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T`` (``S [d, v]``
    per kv head, ``a_t = exp(log_decay_t)``, 1 without a gate) and ``out_t = q_t^T S_t``. ``beta [b, l, n]``. The state
    restarts (is zeroed) where ``segment_ids [b, l]`` changes; where ``kv_valid [b, l]`` is False the position leaves it
    unchanged (its query still reads it). With ``return_state``, also the states after the last position
    ``[b, n, d, v]``."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    b, l, h, d = q.shape
    n, g = k.shape[2], h // k.shape[2]
    log_decay = np.zeros((b, l, n)) if log_decay is None else np.asarray(log_decay, np.float64)
    out = np.zeros((b, l, h, v.shape[-1]))
    states = np.zeros((b, n, d, v.shape[-1]))
    for bi in range(b):
        state = np.zeros((n, d, v.shape[-1]))
        for t in range(l):
            if segment_ids is not None and t > 0 and segment_ids[bi, t] != segment_ids[bi, t - 1]:
                state = np.zeros_like(state)
            if kv_valid is None or kv_valid[bi, t]:
                for j in range(n):
                    kt, bt = k[bi, t, j], beta[bi, t, j]
                    erase = np.eye(d) - bt * np.outer(kt, kt)
                    state[j] = np.exp(log_decay[bi, t, j]) * erase @ state[j] + bt * np.outer(kt, v[bi, t, j])
            for head in range(h):
                out[bi, t, head] = q[bi, t, head] @ state[head // g]
        states[bi] = state
    return (out, states) if return_state else out


def numerical_directional_grad(f, x, direction, eps=1e-6):
    """Central difference of scalar f along direction at x (float64)."""
    x = np.asarray(x, np.float64)
    return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


def log_softmax(x):
    """float64 log-softmax over the last axis."""
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def greedy(next_logits, prefix, steps):
    """Greedy decoding by recomputing: next_logits(tokens [B, L]) -> logits [B, V] of the next token."""
    seq = np.asarray(prefix)
    for _ in range(steps):
        seq = np.concatenate([seq, np.argmax(next_logits(seq), -1)[:, None]], 1)
    return seq


def beam_search(next_logits, prefix, steps, beams, alpha, eos, pad):
    """Beam search over one row by recomputing every hypothesis (no cache).

    Hypotheses extend by the `beams` best summed log-probabilities; a finished one (emitted eos) extends with pad at
    no cost. Returns [(tokens, score / ((5 + length) / 6) ** alpha), ...] best first."""
    hyps = [(list(prefix), 0.0, False, 0)]
    for _ in range(steps):
        cands = []
        live = [h for h in hyps if not h[2]]
        logp = log_softmax(next_logits(np.array([h[0] for h in live]))) if live else []
        for h in hyps:
            if h[2]:
                cands.append((h[0] + [pad], h[1], True, h[3]))
        for h, lp in zip(live, logp):
            for tok in range(lp.shape[0]):
                cands.append((h[0] + [tok], h[1] + lp[tok], eos is not None and tok == eos, h[3] + 1))
        cands.sort(key=lambda c: -c[1])
        hyps = cands[:beams]
    ranked = sorted(((h[0], h[1] / ((5.0 + h[3]) / 6.0) ** alpha) for h in hyps), key=lambda r: -r[1])
    return ranked


def gelu_exact(x):
    """x * Phi(x) with the exact normal CDF."""
    from math import erf, sqrt
    x = np.asarray(x, np.float64)
    return x * 0.5 * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def gelu_tanh(x):
    """GPT-2's tanh approximation of GELU."""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, scale, bias, eps):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis."""
    x = np.asarray(x, np.float64)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def rms_norm(x, scale, eps):
    """x / sqrt(mean(x^2) + eps) * scale (T5's norm: no mean, no bias)."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def sinusoidal(positions, dim):
    """Vaswani et al. 2017 section 3.5: PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...)."""
    pe = np.zeros((len(positions), dim))
    for r, pos in enumerate(positions):
        for i in range(0, dim, 2):
            pe[r, i] = np.sin(pos / 10000 ** (i / dim))
            pe[r, i + 1] = np.cos(pos / 10000 ** (i / dim))
    return pe


def encoder_decoder_params(vocab, embed, mlp, heads_dim, enc_layers, dec_layers):
    """Parameters of a shared-embedding post-LN Transformer (biases everywhere, tied output, sinusoidal positions)."""
    attn = 3 * (embed * heads_dim + heads_dim) + heads_dim * embed + embed  # q, k, v, out kernels + biases
    ffn = embed * mlp + mlp + mlp * embed + embed
    norm = 2 * embed
    return vocab * embed + enc_layers * (attn + ffn + 2 * norm) + dec_layers * (2 * attn + ffn + 3 * norm)


def assert_same_tree(got, want):
    """Fail unless ``got`` and ``want`` (pytrees of arrays: variables, params) hold leaves at exactly the same paths,
    naming any missing or extra one, and each leaf equal to the letter (shape and dtype included). Unlike zipping
    two leaf lists, a leaf dropped or added on one side cannot pass unseen."""
    import jax

    def flat(tree):
        return {jax.tree_util.keystr(path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    g, w = flat(got), flat(want)
    assert g.keys() == w.keys(), f"missing: {sorted(w.keys() - g.keys())}; extra: {sorted(g.keys() - w.keys())}"
    for key, leaf in w.items():
        np.testing.assert_array_equal(g[key], leaf, err_msg=key, strict=True)


# Fixtures ``torch`` and ``transformers`` for the tests that compare with PyTorch models (import these functions into
# the test module): a test that takes one is skipped where torch or transformers is not installed, and only that test.
def assert_config_refused_at_once(folder, match):
    """``load_hf(folder)`` raises a `ValueError` matching ``match`` in one line under 300 characters, within 0.5 s:
    a config.json size is refused before anything is read or sized by it."""
    import time

    import flaxformer_lite as ffl
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match) as err:
        ffl.interop.load_hf(folder)
    assert time.perf_counter() - start < 0.5
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


@pytest.fixture(scope="module", name="torch")
def torch_fixture():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module", name="transformers")
def transformers_fixture(torch):
    return pytest.importorskip("transformers")
