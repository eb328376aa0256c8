"""The model of a run: built from the config and the run's tokenizer, or read from ``train.init_from`` (a Hugging
Face folder or another run) with the ``model.*`` overrides that leave its architecture alone; its training task;
the pretrained weights grafted in; and the samples written at the end.
"""
from __future__ import annotations

import dataclasses
import sys

RUNTIME_MODEL_KEYS = ("dtype", "remat", "dropout_rate", "attention_dropout_rate", "attention_impl")  # not architecture


TOKENIZER_MODEL_KEYS = ("vocab_size", "pad_id", "bos_id", "eos_id")  # set from the run's tokenizer


def model_overrides(overrides) -> list[str]:
    """The ``model.*`` keys given on the command line, without the prefix."""
    return [o.split("=", 1)[0].strip()[len("model."):] for o in overrides if o.startswith("model.")]


def note_ignored(keys, why: str) -> None:
    if keys:
        print(f"train.py: note: {why}; ignoring {', '.join('model.' + k for k in keys)}", file=sys.stderr)


def load_pretrained_weights(cfg, overrides):
    """``train.init_from``'s weights, tokenizer and model config (with the ``model.*`` overrides that leave the
    architecture alone), or None."""
    if not cfg.train.init_from:
        return None
    from ..pretrained import load_pretrained
    pretrained = load_pretrained(cfg.train.init_from)
    given = model_overrides(overrides)
    kept = {k: getattr(cfg.model, k) for k in given if k in RUNTIME_MODEL_KEYS}
    note_ignored([k for k in given if k not in RUNTIME_MODEL_KEYS], "the architecture comes from train.init_from "
                  f"(allowed: {', '.join('model.' + k for k in RUNTIME_MODEL_KEYS)})")
    pretrained.cfg = dataclasses.replace(pretrained.cfg, **kept)
    print(f"starting from {pretrained.source} ({pretrained.cfg.model}, {pretrained.cfg.num_layers} layers)")
    return pretrained


def model_and_task(cfg, data, pretrained, overrides=()):
    """The model config (fitted to the tokenizer, or the pretrained one), the model, and its task."""
    from ..models import SequenceClassifier, build
    from ..training import make_task
    tok = data.tokenizer
    if pretrained is None:
        note_ignored([k for k in model_overrides(overrides) if k in TOKENIZER_MODEL_KEYS],
                      "the vocabulary and special ids come from the tokenizer (set data.vocab_size instead)")
        model_cfg = dataclasses.replace(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                                        eos_id=tok.eos_id)
    else:
        model_cfg = pretrained.cfg
        if tok.vocab_size > model_cfg.vocab_size:
            raise ValueError(f"the tokenizer of {pretrained.source} has {tok.vocab_size} ids, more than the model's "
                             f"vocabulary ({model_cfg.vocab_size})")
    cfg = dataclasses.replace(cfg, model=model_cfg)
    classify = cfg.data.objective == "classify"
    model = SequenceClassifier(model_cfg, len(data.label_names)) if classify else build(model_cfg)
    task = make_task(cfg.data.objective, model, model_cfg.model, label_smoothing=cfg.optim.label_smoothing,
                     z_loss=cfg.optim.z_loss)
    return cfg, model, task


def grafter(pretrained, objective):
    """warm_start for the loop: the pretrained weights into the backbone (classify) or the whole model."""
    from ..pretrained import graft
    return lambda params: graft(params, pretrained.params, "backbone" if objective == "classify" else None)


def sample_fn(model, data, cfg):
    """Continuations of a few held-out prompts (objectives that declare a prompt key), or None."""
    import jax
    import jax.numpy as jnp

    from ..decoding import generate
    from ..data import get_objective
    key = get_objective(data.objective).prompt_key
    if cfg.train.samples <= 0 or key is None:
        return None
    tok = data.tokenizer

    def sample(params):
        prompts = jnp.asarray(data.eval.batch(0)[key][:cfg.train.samples, :16])
        start = prompts.shape[1] if key == "tokens" else 0  # a decoder continues its prompt; an encoder-decoder
        n = min(cfg.train.sample_tokens, model.cfg.max_len - start - 1)  # answers it
        if n < 1:
            return []  # no room after the prompt: nothing to sample
        out = generate(model, {"params": params}, prompts, n, temperature=0.8, top_k=40,
                           rng=jax.random.PRNGKey(cfg.train.seed), eos_id=tok.eos_id)
        return [f"{tok.decode(p)} ||| {tok.decode(o[start:])}" for p, o in zip(prompts.tolist(), out.tolist())]
    return sample
