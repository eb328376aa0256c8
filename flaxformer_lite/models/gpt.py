"""`GPT`: a causal decoder-only language model (Radford et al. 2018/2019), with prefix-LM and packed-sequence masks.

Shape key: b batch, l length, e embed dim, v vocab.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..attention import Mask
from ..layers.blocks import LayerStack
from ..layers.common import final_norm, output_head
from ..layers.embedder import CacheIndex, Embedder
from ..layers.norms import apply_norm
from .checks import check_condition, check_ids, check_mask_shape, check_tokens, segment_positions
from .config import ModelConfig


class GPT(nn.Module):
    """Causal LM: ``tokens [b, l]`` -> ``logits [b, l, v]`` (float32).

    ``prefix_lengths [b]`` switches to the prefix-LM mask (bidirectional over the prefix); ``segment_ids [b, l]``
    packs several documents per row (no attention across them, positions restart per document unless given).
    ``cfg.sliding_window`` limits every query to that many latest keys (Mistral); it excludes ``prefix_lengths``.

    The same class is GPT-2 and the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3): ``position="rotary"``,
    ``norm="rmsnorm"``, ``activation="swiglu"``, ``use_bias=False`` and the `ModelConfig` fields ``num_kv_heads``,
    ``head_dim``, ``rope_scaling``, ``qkv_bias``, ``qk_norm``, ``sliding_window`` (see the presets).
    """

    cfg: ModelConfig

    def setup(self):
        self.embedder = Embedder(self.cfg)
        self.decoder = LayerStack(self.cfg, self.cfg.num_layers)
        self.final_norm = final_norm(self.cfg)
        self.lm_head = output_head(self.cfg)
        self.cache_index = CacheIndex()

    def hidden(self, tokens, *, positions=None, segment_ids=None, prefix_lengths=None, condition=None,
               deterministic=True, decode=None) -> jax.Array:
        """The final hidden states ``[b, l, e]`` (after the final norm); arguments as ``__call__``."""
        check_tokens(tokens, self.cfg)
        check_ids(positions, tokens, self.cfg, "positions", "max_len")
        check_mask_shape(segment_ids, tokens, "segment_ids")
        check_condition(condition, tokens, self.cfg)
        b, l = tokens.shape
        start = None
        if decode:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) is for training; decode one sequence per row")
            start = self.cache_index(l)
        if positions is None:
            positions = segment_positions(segment_ids) if segment_ids is not None else \
                jnp.broadcast_to(jnp.arange(l), (b, l)) + (0 if start is None else start)
        # the window also bounds decoding: the cache keeps every key, the mask (offset by the cache index) hides
        # the ones more than sliding_window - 1 positions back
        mask = Mask(causal=True, window=self.cfg.sliding_window, prefix_lengths=prefix_lengths,
                    q_segment_ids=segment_ids, kv_segment_ids=segment_ids, q_offset=start)
        x = self.embedder(tokens, positions, deterministic=deterministic)
        x = self.decoder(x, mask=mask, positions=positions, deterministic=deterministic, decode=decode,
                         cache_index=start, condition=condition)
        return x if self.final_norm is None else apply_norm(self.final_norm, x, condition)

    def output_embedding(self) -> jax.Array:
        """The output projection as a ``[v, e]`` matrix (``logits = hidden @ output_embedding().T``): the tied token
        embedding, or the untied head's kernel transposed. Lets a trainer fuse the loss over the vocabulary."""
        if self.lm_head is None:
            return self.embedder.token.embedding
        return self.lm_head.variables["params"]["kernel"].T

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``[b, l, e]`` -> float32 ``[b, l, v]``."""
        out = self.embedder.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, tokens, *, positions=None, segment_ids=None, prefix_lengths=None, condition=None,
                 deterministic=True, decode=None) -> jax.Array:
        """``tokens [b, l]`` -> ``logits [b, l, v]``.

        Args:
          positions: int ``[b, l]`` in ``[0, max_len)`` (default ``0..l-1``, restarting per segment).
          segment_ids: int ``[b, l]`` packed-document ids.
          prefix_lengths: int ``[b]`` prefix-LM prefix lengths.
          condition: ``[b, condition_dim]`` input of the conditional norms (``cfg.condition_dim > 0``); None acts
            as a zero condition (the plain norms).
          deterministic: False enables dropout (needs a ``dropout`` rng).
          decode: None, ``"prefill"`` or ``"step"`` with the ``cache`` collection mutable (see `ffl.generate`).
        """
        return self.logits(self.hidden(tokens, positions=positions, segment_ids=segment_ids,
                                       prefix_lengths=prefix_lengths, condition=condition,
                                       deterministic=deterministic, decode=decode))
