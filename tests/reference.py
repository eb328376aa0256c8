"""Independent float64 NumPy references. Written from the papers' definitions, not from the package's code.

Shapes: q [b, lq, h, d], k [b, lk, n, d], v [b, lk, n, dv]; dense masks [b, lq, lk] bool (True = attend).
"""
from __future__ import annotations

import numpy as np


def dense_mask(b, lq, lk, *, causal=False, prefix_lengths=None, kv_lengths=None, kv_valid=None,
               q_segment_ids=None, kv_segment_ids=None, q_offset=0):
    """The mask each Mask field describes, built entry by entry: bool [b, lq, lk]."""
    out = np.ones((b, lq, lk), bool)
    off = np.broadcast_to(np.asarray(q_offset), (b,))
    for bi in range(b):
        for i in range(lq):
            for j in range(lk):
                ok = True
                if causal or prefix_lengths is not None:
                    ok &= j <= i + off[bi] or (prefix_lengths is not None and j < prefix_lengths[bi])
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
    m = np.ones(logits.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask)[:, None], logits.shape)
    logits = np.where(m, logits, -np.inf)
    row_max = logits.max(-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.where(m, np.exp(logits - row_max), 0.0)
    total = p.sum(-1, keepdims=True)
    probs = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)
    if keep is not None:
        probs = probs * np.asarray(keep) / (1.0 - rate)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


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


def numerical_directional_grad(f, x, direction, eps=1e-6):
    """Central difference of scalar f along direction at x (float64)."""
    x = np.asarray(x, np.float64)
    return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
