"""``python -m flaxformer_lite.plots attention|curves ...``: one command per picture (see --help)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _tokens(pretrained, text: str, max_tokens: int):
    """``(ids, pieces)`` of ``text`` as the model reads it ([CLS] ... [SEP] for BERT)."""
    tok = pretrained.tokenizer
    ids = tok.encode(text)[:max_tokens]
    if pretrained.cfg.model == "bert":
        ids = [tok.cls_id] + ids[:max_tokens - 2] + [tok.sep_id]
    return ids, tok.pieces(ids)


def attention(args) -> Path:
    """The ``attention`` picture: the model's attention weights ``[h, q, k]`` per layer on ``--text``, as a PNG."""
    import jax.numpy as jnp

    from ..models import build
    from ..pretrained import load_pretrained
    from .attention_maps import attention_maps, plot_attention_maps
    pretrained = load_pretrained(args.model)
    ids, pieces = _tokens(pretrained, args.text, min(args.max_tokens, pretrained.cfg.max_len))
    if not ids:
        raise ValueError("--text gives no tokens")
    model = build(pretrained.cfg)
    method = "encode" if pretrained.cfg.model == "encoder_decoder" else None
    maps = attention_maps(model, {"params": pretrained.params}, jnp.asarray([ids], jnp.int32), method=method)
    out = args.out or Path(args.model) / "attention.png"
    return plot_attention_maps(maps, pieces, out)


def curves(args) -> Path:
    """The ``curves`` picture: a run's loss / learning-rate (/ accuracy) against the step, as a PNG."""
    from .curves import plot_curves
    return plot_curves(args.run_dir, args.out)


def main(argv=None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``); 0 on success, 2 on a `ValueError` (printed)."""
    parser = argparse.ArgumentParser(prog="python -m flaxformer_lite.plots", description=__doc__)
    sub = parser.add_subparsers(dest="picture", required=True)
    att = sub.add_parser("attention", help="attention heatmaps per layer and head for a model and a text")
    att.add_argument("--model", required=True, help="a train.py run folder or a Hugging Face model folder")
    att.add_argument("--text", required=True, help="the text to attend over")
    att.add_argument("--out", help="PNG path (default MODEL/attention.png)")
    att.add_argument("--max-tokens", type=int, default=32, help="truncate the text to this many tokens (default 32)")
    att.set_defaults(run=attention)
    cur = sub.add_parser("curves", help="loss / learning-rate (/ accuracy) curves from a run's metrics.jsonl")
    cur.add_argument("run_dir", help="a train.py run folder")
    cur.add_argument("--out", help="PNG path (default RUN_DIR/curves.png)")
    cur.set_defaults(run=curves)
    args = parser.parse_args(argv)
    try:
        path = args.run(args)
    except ValueError as err:
        print(f"{parser.prog} {args.picture}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
