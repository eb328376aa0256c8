"""Attention kernels: pure functions, no parameters. Layout ``[batch, length, heads, head_dim]`` everywhere.

- `Mask`: the structured mask (causal, sliding window, prefix-LM, padding, packed segments).
- `softmax_attention(q, k, v, *, mask, bias, scale, impl)`: reference | xla | blockwise | cudnn | flash | pallas |
  auto;
  `attend_scores(scores, v, *, mask, head_mix)` for logits made elsewhere (additive, Synthesizer, talking-heads);
  `attention_weights` for the weights themselves (attention maps).
- `linear_attention(q, k, v, *, mask, feature_map, decay, log_decay, impl)`: elu | relu | favor; non-causal, causal,
  prefix, segments; decay gates (fixed per head, or per position); impl xla | pallas | auto (`linear_impl`);
  `linear_init_state` / `linear_prefill_state` / `linear_step` for recurrent decoding.
- `delta_attention(q, k, v, beta, *, mask, decay, log_decay, impl)`: the delta rule (DeltaNet) and its gated form,
  causal, in chunk form; impl xla | pallas | auto (`delta_impl`); `delta_init_state` / `delta_step` for recurrent
  decoding.

Layout, by kernel family: `softmax/` (dispatch, the dense and XLA paths, blockwise, the Pallas flash kernels, splash)
and `recurrent/` (linear attention, its chunk form, the delta rule, their Pallas kernels, and what they share). What
every family shares stays here: `masks.py` (`Mask`), `bounds.py` (the block-skipping bounds), `checks.py`,
`dropout.py`, and `pallas.py` (the tile helpers of every Pallas kernel).
"""
from .masks import Mask
from .recurrent import (FEATURE_MAPS, LINEAR_IMPLS, EluFeatureMap, FavorFeatureMap, FeatureMap, LinearState,
                        ReluFeatureMap, delta_attention, delta_impl, delta_init_state, delta_step, get_feature_map,
                        linear_attention, linear_impl, linear_init_state, linear_prefill_state, linear_step)
from .softmax import IMPLS, attend_scores, attention_weights, choose_impl, softmax_attention

__all__ = [
    "Mask", "softmax_attention", "attend_scores", "attention_weights", "IMPLS", "choose_impl", "linear_attention",
    "LINEAR_IMPLS", "linear_impl", "linear_init_state", "linear_step", "linear_prefill_state", "LinearState",
    "FeatureMap", "EluFeatureMap",
    "ReluFeatureMap", "FavorFeatureMap", "FEATURE_MAPS", "get_feature_map", "delta_attention", "delta_impl",
    "delta_init_state", "delta_step",
]
