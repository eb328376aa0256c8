"""Optax optimizers and schedules from the config: AdamW/Adam with the configured betas and eps, global-norm
clipping, weight decay on matrices only (never on norms or biases), and linear-warmup + cosine, Noam, or constant
learning rates."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_schedule(opt, total_steps: int, embed_dim: int):
    """``step -> learning rate``.

    - cosine: linear warmup to ``opt.lr`` over ``warmup_steps``, cosine decay to ``lr * min_lr_ratio`` at the end;
    - noam: ``opt.lr * embed_dim^-0.5 * min(step^-0.5, step * warmup^-1.5)`` (Vaswani et al. 2017; lr = 1 is the
      paper's schedule);
    - constant: linear warmup, then ``opt.lr``.
    """
    warmup = max(1, opt.warmup_steps)
    if opt.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, opt.lr, warmup, max(total_steps, warmup + 1),
                                                  end_value=opt.lr * opt.min_lr_ratio)
    if opt.schedule == "noam":
        def noam(step):
            s = jnp.maximum(jnp.asarray(step, jnp.float32) + 1.0, 1.0)
            return opt.lr * embed_dim ** -0.5 * jnp.minimum(s ** -0.5, s * warmup ** -1.5)
        return noam
    if opt.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, opt.lr, warmup), optax.constant_schedule(opt.lr)],
                                    [warmup])
    raise ValueError(f"optim.schedule must be one of ['cosine', 'noam', 'constant'], got {opt.schedule!r}")


NO_DECAY = ("logits_mix", "weights_mix")  # talking-heads mixings start at identity: decay would pull them to zero


def decay_mask(params):
    """True for parameters that get weight decay: matrices and embeddings, not biases, norm scales or the
    talking-heads mixing matrices (``NO_DECAY``)."""
    def decays(path, p):
        names = {str(getattr(k, "key", k)) for k in path}
        return getattr(p, "ndim", 0) >= 2 and not names & set(NO_DECAY)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt, total_steps: int, embed_dim: int):
    """``(optax transformation, schedule)`` for the ``optim`` config section."""
    schedule = make_schedule(opt, total_steps, embed_dim)
    if opt.name == "adamw":
        core = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                           mask=decay_mask)
    elif opt.name == "adam":
        core = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
    else:
        raise ValueError(f"optim.name must be 'adamw' or 'adam', got {opt.name!r}")
    parts = ([optax.clip_by_global_norm(opt.clip_norm)] if opt.clip_norm > 0 else []) + [core]
    return optax.chain(*parts), schedule
