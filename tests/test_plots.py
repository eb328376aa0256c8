"""Pictures: the attention weights layers sow equal the float64 references (softmax, variants); attention maps
per layer of a scanned model; PNGs of maps and of a run's curves (pixel size = figure size x dpi, the heatmaps and
lines drawn); the one-command CLI on a run folder."""
import dataclasses
import json
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

import reference
from cases import B, build, tiny_config
from flaxformer_lite.experiment import ExperimentConfig, to_dict
from flaxformer_lite.data import train_tokenizer
from flaxformer_lite.layers import MultiHeadAttention
from flaxformer_lite.models import GPT
from flaxformer_lite.training import Checkpoints

matplotlib = pytest.importorskip("matplotlib")
import matplotlib.image  # noqa: E402
from flaxformer_lite.plots import attention_maps, plot_attention_maps, plot_curves  # noqa: E402
from flaxformer_lite.plots.__main__ import main as plots_main  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
DPI = 110  # what save_figure writes at


def _check_png(path, size_inches=None):
    """The file is a PNG whose IHDR pixel size is ``size_inches * DPI`` (when given) and whose pixels are drawn:
    not one colour, and partly chromatic (viridis heatmaps and coloured lines; text and axes are grey)."""
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    if size_inches is not None:
        assert (width, height) == (round(size_inches[0] * DPI), round(size_inches[1] * DPI))
    rgb = matplotlib.image.imread(path)[..., :3]
    assert rgb.shape[:2] == (height, width)
    assert rgb.std() > 0 and len(np.unique(rgb.reshape(-1, 3), axis=0)) > 1
    chroma = rgb.max(-1) - rgb.min(-1)
    return (chroma > 0.1).mean()


@pytest.mark.parametrize("fields", [{}, {"talking_heads": True}, {"attention": "additive"},
                                    {"attention": "synthesizer_random"}], ids=["softmax", "talking", "additive",
                                                                                "random"])
def test_sown_weights_match_reference(fields):
    lq, _, mask, dense = build("causal_kv_valid")
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, head_dim=8, max_len=48, **fields)
    x = np.random.default_rng(2).standard_normal((B, lq, 24))
    variables = layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    variables = jax.tree.map(lambda v: v + 0.3 * jax.random.normal(jax.random.key(4), v.shape), variables)
    _, state = layer.apply(variables, jnp.asarray(x, jnp.float32), mask=mask, mutable=["intermediates"])
    (got,) = state["intermediates"]["attention_weights"]
    params = jax.tree.map(np.asarray, nn.unbox(variables["params"]))
    logits, mix = reference.variant_logits(params, x, fields.get("attention", "softmax"), "talking_heads" in fields)
    np.testing.assert_allclose(got, reference.attention_weights(logits, dense, mix), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_gpt():
    cfg = tiny_config(scan_layers=True)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, 97, (1, 9)), jnp.int32)
    return cfg, GPT(cfg).init(jax.random.key(0), tokens), tokens


def test_attention_maps_per_layer_and_png(tiny_gpt, tmp_path):
    cfg, variables, tokens = tiny_gpt
    maps = attention_maps(GPT(cfg), variables, tokens)
    assert [label for label, _ in maps] == ["decoder/layer_0/self_attention", "decoder/layer_1/self_attention"]
    for _, weights in maps:
        assert weights.shape == (1, 4, 9, 9)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(weights[0, 0], 1) == 0)  # causal
    path = plot_attention_maps(maps, [f"t{i}" for i in range(9)], tmp_path / "maps.png")
    # 2 layers x 4 heads of 2.2-inch panels (9 tokens are too few to widen them); the heatmaps fill a good part
    assert _check_png(path, (4 * 2.2, 2 * 2.2)) > 0.15
    with pytest.raises(ValueError, match="no attention weights"):
        linear = GPT(dataclasses.replace(cfg, attention="linear"))
        attention_maps(linear, linear.init(jax.random.key(0), tokens), tokens)


def test_curves_png_and_errors(tmp_path):
    rows = [{"step": s, "loss": 5.0 / s, "lr": 1e-3 * min(1, s / 3), "tokens_per_s": 1.0} for s in range(1, 8)]
    rows.append({"step": 7, "eval_loss": 1.1, "eval_accuracy": 0.4})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _check_png(plot_curves(tmp_path), (3 * 5, 3.8)) > 0  # loss, lr and accuracy panels; coloured lines
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        plot_curves(tmp_path / "missing")


def test_cli_on_a_run_folder(tiny_gpt, tmp_path, capsys):
    cfg, variables, _ = tiny_gpt
    texts = ["the cat sat on the mat", "a dog ran in the park", "to be or not to be, that is the question",
             "whether tis nobler in the mind to suffer the slings and arrows"] * 20  # room for 70 pieces (at most 79)
    tok = train_tokenizer(texts, vocab_size=70, byte_fallback=False)
    tok.save(tmp_path / "tokenizer.model")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(to_dict(ExperimentConfig(model=cfg)), sort_keys=False))
    ckpt = Checkpoints(tmp_path / "checkpoints", async_save=False)
    ckpt.save(1, {"params": nn.unbox(variables["params"])}, {"step": 1})
    ckpt.close()
    assert plots_main(["attention", "--model", str(tmp_path), "--text", "the cat sat", "--out",
                       str(tmp_path / "a.png")]) == 0
    assert _check_png(tmp_path / "a.png") > 0.1
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "lr": 1e-3}) + "\n")
    assert plots_main(["curves", str(tmp_path)]) == 0 and (tmp_path / "curves.png").is_file()
    assert plots_main(["curves", str(tmp_path / "nowhere")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
