"""Generation with a KV cache (softmax attention) or recurrent state (linear attention): `generate` (greedy,
temperature, top-k, top-p) and `beam_search` (length penalty, EOS, per-row finished flags), each compiled as one
loop. Works for `GPT` (also with a prefix-LM prompt) and `EncoderDecoder` (the encoder runs once; cross-attention
keys/values are projected once and cached).

Shape key: b batch, k beams, p prompt length, n new tokens, v vocab.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .ranges import check_range
from .names import LAYER_STACKS
from .models.checks import check_tokens
from .models.encoder_decoder import EncoderDecoder
from .models.gpt import GPT


@dataclasses.dataclass(frozen=True)
class _Task:
    """How to run one model kind: static, hashable (a jit static argument)."""

    model: Any
    new_tokens: int

    @property
    def seq2seq(self) -> bool:
        """Whether the model is an `EncoderDecoder` (the prompt is its source)."""
        return isinstance(self.model, EncoderDecoder)


def _as_array(name: str, x):
    """``x`` (an array or array-like: list, NumPy) as a jax array; None stays None."""
    if x is None:
        return None
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as err:  # not numeric, or ragged nested lists
        raise ValueError(f"{name} must be a numeric array or rectangular array-like, got {type(x).__name__} "
                         f"({str(err).splitlines()[0]})") from None


def _check(model, variables, prompt, max_new_tokens, prefix_lengths, src_padding_mask):
    """Validate the arguments shared by `generate` and `beam_search` (token ids too, when the prompt is concrete);
    return ``(prompt, prefix_lengths, src_padding_mask)`` as jax arrays."""
    if not isinstance(model, (GPT, EncoderDecoder)):
        raise ValueError(f"generation takes a GPT or EncoderDecoder model, got {type(model).__name__}")
    if not isinstance(variables, Mapping) or "params" not in variables:
        keys = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(f"variables must be the model's {{'params': ...}} (what model.init returns), got {keys}")
    cfg = model.cfg
    prompt = _as_array("prompt", prompt)
    check_tokens(prompt, cfg, "prompt")
    if prompt.shape[1] < 1:
        raise ValueError(f"prompt must hold at least one token per row, got shape {prompt.shape}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    target = (1 if isinstance(model, EncoderDecoder) else prompt.shape[1]) + max_new_tokens
    if target > cfg.max_len:
        raise ValueError(f"prompt + max_new_tokens = {target} tokens > max_len {cfg.max_len}")
    prefix_lengths = _as_array("prefix_lengths", prefix_lengths)
    if prefix_lengths is not None and (isinstance(model, EncoderDecoder) or prefix_lengths.shape != prompt.shape[:1]
                                       or not jnp.issubdtype(prefix_lengths.dtype, jnp.integer)):
        raise ValueError(f"prefix_lengths must be int [batch] = {list(prompt.shape[:1])} and only for GPT, got "
                         f"{prefix_lengths.dtype} {list(prefix_lengths.shape)} for {type(model).__name__}")
    if prefix_lengths is not None:  # checked here: inside the jitted loop they are traced
        check_range("prefix_lengths", prefix_lengths, lambda x: (x >= 0) & (x <= prompt.shape[1]),
                    f"in [0, {prompt.shape[1]}] (the prompt length)")
    src_padding_mask = _as_array("src_padding_mask", src_padding_mask)
    if src_padding_mask is not None and (not isinstance(model, EncoderDecoder)
                                         or src_padding_mask.shape != prompt.shape):
        raise ValueError(f"src_padding_mask must match the source {prompt.shape} of an EncoderDecoder")
    return prompt, prefix_lengths, src_padding_mask


def _param_shapes(params) -> dict[str, tuple]:
    """``{"path/to/param": shape}`` of a params tree (boxed or not), in tree order."""
    leaves = jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path): tuple(np.shape(leaf))
            for path, leaf in leaves}


def _check_params(task: _Task, params, prompt) -> None:
    """Raise `ValueError` naming the first parameter whose path or shape differs from what ``task.model.init``
    makes (e.g. another model's variables). Runs when a loop is traced (shapes only), so once per compile."""
    src = jnp.zeros(prompt.shape, jnp.int32)
    args = (src, src[:, :1]) if task.seq2seq else (src,)
    want = _param_shapes(jax.eval_shape(lambda: task.model.init(jax.random.key(0), *args))["params"])
    got = _param_shapes(params)
    for path, shape in want.items():
        if got.get(path) != shape:
            found = f"shape {got[path]}" if path in got else "no such parameter"
            raise ValueError(f"variables['params'] do not fit this {type(task.model).__name__}: {path} should have "
                             f"shape {shape}, found {found} (another model's variables?)")
    extra = [path for path in got if path not in want]
    if extra:
        raise ValueError(f"variables['params'] do not fit this {type(task.model).__name__}: it has no {extra[0]} "
                         f"(found shape {got[extra[0]]}; another model's variables?)")


def _check_finite(first_bad, new_tokens: int) -> None:
    """Raise `ValueError` if a decoding loop saw non-finite logits; ``first_bad`` is the first such step (-1: none).
    One host read after the loop; skipped when traced (inside a caller's jit)."""
    try:
        step = int(first_bad)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerIntegerConversionError):
        return
    if step >= 0:
        raise ValueError(f"the model's logits are not finite (NaN or inf) at new token {step + 1} of {new_tokens}; "
                         "check the variables for NaN or inf parameters")


def _not_finite_at(first_bad, logits, step):
    """``first_bad`` (int32 scalar, -1: none yet) updated with ``step`` if ``logits`` hold a NaN or an infinity."""
    return jnp.where((first_bad < 0) & ~jnp.all(jnp.isfinite(logits)), step, first_bad).astype(jnp.int32)


def _init_cache(task: _Task, params, prompt, total: int, batch: int):
    """Zeroed cache variables for ``batch`` rows and ``total`` target positions (shapes only, no compute)."""
    zeros = jnp.zeros((batch, total), jnp.int32)
    if task.seq2seq:
        src = jnp.zeros((batch, prompt.shape[1]), jnp.int32)
        shapes = jax.eval_shape(lambda: task.model.init(jax.random.key(0), src, zeros, decode="prefill"))
    else:
        shapes = jax.eval_shape(lambda: task.model.init(jax.random.key(0), zeros, decode="prefill"))
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _prefill(task: _Task, params, prompt, prefix_lengths, src_padding_mask):
    """Run the prompt through the model: ``(last logits [b, v], cache, encoded or None, first target tokens)``."""
    b = prompt.shape[0]
    if task.seq2seq:
        cfg = task.model.cfg
        encoded = task.model.apply({"params": params}, prompt, src_padding_mask=src_padding_mask,
                                   method=EncoderDecoder.encode)
        start = jnp.full((b, 1), cfg.bos_id, jnp.int32)
        cache = _init_cache(task, params, prompt, 1 + task.new_tokens, b)
        logits, mut = task.model.apply({"params": params, "cache": cache}, encoded, start,
                                       src_padding_mask=src_padding_mask, decode="prefill",
                                       method=EncoderDecoder.decode, mutable=["cache"])
        return logits[:, -1], mut["cache"], encoded, start
    cache = _init_cache(task, params, prompt, prompt.shape[1] + task.new_tokens, b)
    logits, mut = task.model.apply({"params": params, "cache": cache}, prompt, prefix_lengths=prefix_lengths,
                                   decode="prefill", mutable=["cache"])
    return logits[:, -1], mut["cache"], None, prompt


def _step(task: _Task, params, cache, token, encoded, src_padding_mask):
    """One token ``[b]`` through the model: ``(logits [b, v], cache)``."""
    variables = {"params": params, "cache": cache}
    if task.seq2seq:
        logits, mut = task.model.apply(variables, encoded, token[:, None], src_padding_mask=src_padding_mask,
                                       decode="step", method=EncoderDecoder.decode, mutable=["cache"])
    else:
        logits, mut = task.model.apply(variables, token[:, None], decode="step", mutable=["cache"])
    return logits[:, -1], mut["cache"]


def sample_logits(logits, rng, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None):
    """Pick one token per row from ``logits [b, v]``: argmax when ``temperature == 0``, else sample from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely and/or the smallest set whose
    probability reaches ``top_p`` (nucleus). Returns int32 ``[b]``."""
    if temperature == 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, -1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        drop_sorted = (cum - jax.nn.softmax(sorted_logits, -1)) >= top_p  # keep tokens until top_p is reached
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def _is_number(x) -> bool:
    """A finite real number (not a bool, NaN or an infinity)."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _check_sampling(temperature, top_k, top_p, rng, vocab_size: int):
    if not _is_number(temperature) or not temperature >= 0.0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be an int in [1, vocab_size = {vocab_size}] or None, got {top_k!r}")
    if top_p is not None and (not _is_number(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng, a PRNG key")
    typed = isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
    raw = isinstance(rng, jax.Array) and rng.dtype == jnp.uint32 and rng.ndim == 1  # jax.random.PRNGKey(seed)
    if rng is not None and not (typed or raw):
        raise ValueError(f"rng must be a PRNG key from jax.random.key(seed) (or jax.random.PRNGKey), got "
                         f"{type(rng).__name__} {rng!r}")


def _check_eos(eos_id, vocab_size: int):
    if eos_id is not None and (not isinstance(eos_id, (int, np.integer)) or isinstance(eos_id, bool)
                               or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id must be an int in [0, vocab_size = {vocab_size}) or None, got {eos_id!r}")
    return None if eos_id is None else int(eos_id)


def generate(model, variables, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, rng=None, eos_id: int | None = None, prefix_lengths=None,
             src_padding_mask=None) -> jax.Array:
    """Extend ``prompt`` by ``max_new_tokens`` tokens with the cache; one compiled loop.

    Args:
      model: a `GPT` or `EncoderDecoder`; variables: its ``{"params": ...}``.
      prompt: int ``[b, p]`` (an array or array-like), ``p >= 1``, ids in ``[0, vocab_size)``: the context for GPT,
        the source for an encoder-decoder.
      temperature, top_k, top_p, rng: sampling (`sample_logits`); ``temperature=0`` is greedy;
        ``1 <= top_k <= vocab_size``.
      eos_id: rows that produce it stop; later positions hold ``cfg.pad_id``.
      prefix_lengths: int ``[b]`` (array-like), a prefix-LM prompt (GPT): bidirectional over its first tokens.
      src_padding_mask: bool ``[b, p]`` (encoder-decoder): True = a real source token, False = padding.

    Returns:
      GPT: ``[b, p + n]`` (prompt then new tokens). Encoder-decoder: ``[b, 1 + n]`` (``bos_id`` then new tokens).

    Raises `ValueError` for bad arguments, params that do not fit ``model``, or non-finite logits (NaN or inf
    parameters), the last checked once after the loop.
    """
    prompt, prefix_lengths, src_padding_mask = _check(model, variables, prompt, max_new_tokens, prefix_lengths,
                                                      src_padding_mask)
    _check_sampling(temperature, top_k, top_p, rng, model.cfg.vocab_size)
    eos_id = _check_eos(eos_id, model.cfg.vocab_size)
    task = _Task(model, max_new_tokens)
    rng = jax.random.key(0) if rng is None else rng
    tokens, first_bad = _generate(task, (float(temperature), top_k, top_p, eos_id), variables["params"], prompt,
                                  rng, prefix_lengths, src_padding_mask)
    _check_finite(first_bad, max_new_tokens)
    return tokens


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(task: _Task, sampling, params, prompt, rng, prefix_lengths, src_padding_mask):
    """``(tokens, first step with non-finite logits or -1)``."""
    _check_params(task, params, prompt)
    temperature, top_k, top_p, eos_id = sampling
    pad = task.model.cfg.pad_id
    logits, cache, encoded, start = _prefill(task, params, prompt, prefix_lengths, src_padding_mask)
    b = prompt.shape[0]

    def pick(logits, rng, finished):
        token = sample_logits(logits, rng, temperature, top_k, top_p)
        token = jnp.where(finished, pad, token)
        return token, finished | (token == eos_id) if eos_id is not None else finished

    rngs = jax.random.split(rng, task.new_tokens)
    first, finished = pick(logits, rngs[0], jnp.zeros((b,), bool))
    first_bad = _not_finite_at(jnp.int32(-1), logits, 0)

    def body(carry, xs):
        token, cache, finished, first_bad = carry
        rng, t = xs
        logits, cache = _step(task, params, cache, token, encoded, src_padding_mask)
        nxt, finished = pick(logits, rng, finished)
        return (nxt, cache, finished, _not_finite_at(first_bad, logits, t)), nxt

    (*_, first_bad), rest = jax.lax.scan(body, (first, cache, finished, first_bad),
                                         (rngs[1:], jnp.arange(1, task.new_tokens)))
    return jnp.concatenate([start, first[:, None], rest.T], axis=1), first_bad


# -- beam search ---------------------------------------------------------------------------------------------------
def _map_rows(cache, fn):
    """Apply ``fn(leaf, batch_axis)`` to every cache leaf with a batch axis: axis 0, or axis 1 under a scanned or
    shared layer stack (`LAYER_STACKS`, whose cache leaves are ``[layers, b, ...]``); scalars (the decode index) are
    left alone."""
    def visit(path, leaf):
        scanned = any(getattr(p, "key", None) in LAYER_STACKS for p in path)
        return leaf if leaf.ndim <= int(scanned) else fn(leaf, int(scanned))

    return jax.tree_util.tree_map_with_path(visit, cache)


def length_penalty_factor(lengths, alpha: float):
    """GNMT's ``((5 + length) / 6) ** alpha`` (Wu et al. 2016); scores are divided by it."""
    return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(model, variables, prompt, max_new_tokens: int, *, beam_size: int, length_penalty: float = 0.6,
                eos_id: int | None = None, prefix_lengths=None, src_padding_mask=None):
    """Beam search with the cache; one compiled loop.

    Beams extend by the ``beam_size`` best (sum of log-probabilities) continuations; a beam that emitted ``eos_id``
    is finished and carries on with ``cfg.pad_id`` at no cost. Final ranking divides each beam's score by
    `length_penalty_factor` of its length (up to and including EOS).

    Returns:
      ``(sequences, scores)``: ``[b, beam_size, p + n]`` (GPT; ``[b, beam_size, 1 + n]`` for an encoder-decoder) and
      length-normalised scores ``[b, beam_size]``, best first.

    Raises `ValueError` as `generate` does (bad arguments, params that do not fit ``model``, non-finite logits).
    """
    prompt, prefix_lengths, src_padding_mask = _check(model, variables, prompt, max_new_tokens, prefix_lengths,
                                                      src_padding_mask)
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or not 1 <= beam_size <= model.cfg.vocab_size:
        raise ValueError(f"beam_size must be an int in [1, vocab_size], got {beam_size!r}")
    if not _is_number(length_penalty):
        raise ValueError(f"length_penalty must be a finite number (0: none), got {length_penalty!r}")
    eos_id = _check_eos(eos_id, model.cfg.vocab_size)
    task = _Task(model, max_new_tokens)
    seqs, scores, first_bad = _beam_search(task, (beam_size, float(length_penalty), eos_id), variables["params"],
                                           prompt, prefix_lengths, src_padding_mask)
    _check_finite(first_bad, max_new_tokens)
    return seqs, scores


@functools.partial(jax.jit, static_argnums=(0, 1))
def _beam_search(task: _Task, opts, params, prompt, prefix_lengths, src_padding_mask):
    """``(sequences, scores, first step with non-finite logits or -1)``."""
    _check_params(task, params, prompt)
    beams, alpha, eos_id = opts
    pad = task.model.cfg.pad_id
    logits, cache, encoded, start = _prefill(task, params, prompt, prefix_lengths, src_padding_mask)
    b, n = prompt.shape[0], task.new_tokens
    cache = _map_rows(cache, lambda x, axis: jnp.repeat(x, beams, axis=axis))  # row r*k + j copies row r
    if encoded is not None:
        encoded = jnp.repeat(encoded, beams, axis=0)
        src_padding_mask = None if src_padding_mask is None else jnp.repeat(src_padding_mask, beams, axis=0)
    logits = jnp.repeat(logits, beams, axis=0)
    # Only beam 0 is alive at first, so the first expansion does not pick the same token k times.
    scores = jnp.tile(jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf), (b, 1))
    state = (scores, jnp.zeros((b, beams), bool), jnp.zeros((b, beams), jnp.int32),
             jnp.zeros((b, beams, n), jnp.int32), cache, logits, jnp.int32(-1))

    def body(state, t):
        scores, finished, lengths, tokens, cache, logits, first_bad = state
        first_bad = _not_finite_at(first_bad, logits, t)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1).reshape(b, beams, -1)
        on_pad = jnp.where(jnp.arange(logp.shape[-1]) == pad, 0.0, -jnp.inf)
        logp = jnp.where(finished[..., None], on_pad, logp)
        cand = (scores[..., None] + logp).reshape(b, -1)
        scores, flat = jax.lax.top_k(cand, beams)
        origin, token = flat // logp.shape[-1], (flat % logp.shape[-1]).astype(jnp.int32)
        take = lambda x: jnp.take_along_axis(x, origin, axis=1)
        finished_before = take(finished)
        lengths = take(lengths) + (~finished_before).astype(jnp.int32)
        finished = finished_before | (token == eos_id) if eos_id is not None else finished_before
        tokens = jnp.take_along_axis(tokens, origin[..., None], axis=1).at[:, :, t].set(token)
        rows = (origin + jnp.arange(b)[:, None] * beams).reshape(-1)
        cache = _map_rows(cache, lambda x, axis: jnp.take(x, rows, axis=axis))
        logits, cache = jax.lax.cond(t + 1 < n, lambda: _step(task, params, cache, token.reshape(-1), encoded,
                                                               src_padding_mask), lambda: (logits, cache))
        return (scores, finished, lengths, tokens, cache, logits, first_bad), None

    (scores, finished, lengths, tokens, _, _, first_bad), _ = jax.lax.scan(body, state, jnp.arange(n))
    normalised = scores / length_penalty_factor(lengths, alpha)
    order = jnp.argsort(-normalised, axis=1)
    tokens = jnp.take_along_axis(tokens, order[..., None], axis=1)
    prefix = jnp.broadcast_to(start[:, None, :], (b, beams, start.shape[1]))
    return jnp.concatenate([prefix, tokens], axis=2), jnp.take_along_axis(normalised, order, axis=1), first_bad
