"""Fine-tuning heads over a BERT or GPT backbone (chosen by ``cfg.model``): sequence classification (entailment and
similarity are input formats of it: a text pair with token types or a separator), multiple choice, and token
classification (BERT). The backbone sits under the name ``backbone``, so pretrained params drop in.

Every head takes ``padding_mask`` shaped like its tokens: True = a real (non-padding) token, False = padding
(None: all real). A GPT backbone reads it as right padding: the features come from the last real token.

Shape key: b batch, c choices, l length, e embed dim, n labels.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..layers.common import dense
from .bert import BERT
from .checks import check_mask_shape
from .config import ModelConfig
from .gpt import GPT


def _features(cfg: ModelConfig, tokens, token_type_ids, padding_mask, deterministic):
    """One vector per sequence ``[b, e]``: BERT's pooled [CLS], or GPT's hidden state at the last real token."""
    if cfg.model == "bert":
        return BERT(cfg, name="backbone").encode(tokens, token_type_ids=token_type_ids, padding_mask=padding_mask,
                                                 deterministic=deterministic)[1]
    if cfg.model == "gpt":
        check_mask_shape(padding_mask, tokens, "padding_mask")  # GPT reads it here, not in the backbone
        hidden = GPT(cfg, name="backbone").hidden(tokens, deterministic=deterministic)
        last = (tokens.shape[1] if padding_mask is None else padding_mask.astype(jnp.int32).sum(-1)) - 1
        return jnp.take_along_axis(hidden, jnp.broadcast_to(jnp.asarray(last), (tokens.shape[0],))[:, None, None],
                                   axis=1)[:, 0]
    raise ValueError(f"classification heads take cfg.model 'bert' or 'gpt', got {cfg.model!r}")


class SequenceClassifier(nn.Module):
    """``tokens [b, l]`` -> ``logits [b, n]``. Attributes: cfg (backbone), num_labels."""

    cfg: ModelConfig
    num_labels: int

    @nn.compact
    def __call__(self, tokens, *, token_type_ids=None, padding_mask=None, deterministic=True) -> jax.Array:
        """``tokens [b, l]`` (``token_type_ids``, ``padding_mask [b, l]``: True = a real token) -> ``[b, n]``."""
        x = _features(self.cfg, tokens, token_type_ids, padding_mask, deterministic)
        x = nn.Dropout(self.cfg.dropout_rate)(x, deterministic=deterministic)
        return dense(self.cfg, self.num_labels, ("embed", "classes"), name="classifier")(x).astype(jnp.float32)


class MultipleChoice(nn.Module):
    """``tokens [b, c, l]`` (each choice appended to the context) -> ``logits [b, c]``. Attributes: cfg."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, *, token_type_ids=None, padding_mask=None, deterministic=True) -> jax.Array:
        """``tokens [b, c, l]`` (``token_type_ids``, ``padding_mask [b, c, l]``: True = a real token) ->
        ``[b, c]``."""
        if tokens.ndim != 3:
            raise ValueError(f"MultipleChoice takes tokens [batch, choices, length], got shape {tokens.shape}")
        check_mask_shape(token_type_ids, tokens, "token_type_ids")  # before flattening hides a mismatch
        check_mask_shape(padding_mask, tokens, "padding_mask")
        b, c, l = tokens.shape
        flat = lambda x: None if x is None else x.reshape(b * c, l)
        x = _features(self.cfg, flat(tokens), flat(token_type_ids), flat(padding_mask), deterministic)
        x = nn.Dropout(self.cfg.dropout_rate)(x, deterministic=deterministic)
        return dense(self.cfg, 1, ("embed", "classes"), name="classifier")(x).reshape(b, c).astype(jnp.float32)


class TokenClassifier(nn.Module):
    """BERT token tagging: ``tokens [b, l]`` -> ``logits [b, l, n]``. Attributes: cfg, num_labels."""

    cfg: ModelConfig
    num_labels: int

    @nn.compact
    def __call__(self, tokens, *, token_type_ids=None, padding_mask=None, deterministic=True) -> jax.Array:
        """``tokens [b, l]`` (``token_type_ids``, ``padding_mask [b, l]``: True = a real token) ->
        ``[b, l, n]``."""
        if self.cfg.model != "bert":
            raise ValueError(f"TokenClassifier takes a BERT config (cfg.model='bert'), got {self.cfg.model!r}")
        hidden, _ = BERT(self.cfg, name="backbone").encode(tokens, token_type_ids=token_type_ids,
                                                           padding_mask=padding_mask, deterministic=deterministic)
        hidden = nn.Dropout(self.cfg.dropout_rate)(hidden, deterministic=deterministic)
        return dense(self.cfg, self.num_labels, ("embed", "classes"), name="classifier")(hidden).astype(jnp.float32)
