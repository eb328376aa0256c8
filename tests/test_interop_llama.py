"""The Llama family (Llama, Mistral, Qwen2, Qwen3) against transformers, on tiny random models built and saved here
(no download): logits within 1e-4, greedy generation with the KV cache equal to the argmax of transformers' logits
at every step, and exact round trips (our save_hf read by transformers: the same tensors and logits). With GQA,
Llama 3 rope scaling, Qwen2's q/k/v biases, Qwen3's QK-norm and explicit head_dim, and a Mistral sequence longer than
its sliding window. Also: the presets' published parameter counts, the linear and dynamic rope scalings, sharded and
bfloat16 files, and the config fields refused by name before any weight is read. Only the tests that take the
``torch``/``transformers`` fixtures (or ``family``) need them: the presets, config and save_hf refusals run without."""
import dataclasses
import json
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxformer_lite as ffl
from flaxformer_lite.interop.hf import config_from_hf, config_to_hf
from reference import (assert_config_refused_at_once, assert_same_tree, torch_fixture,  # noqa: F401 (fixtures)
                       transformers_fixture)

WINDOW = 5
COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=1,
              eos_token_id=2)
LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500_000.0}
FAMILIES = {  # config class, fields beyond COMMON, the class transformers must read our files back as
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=False), "LlamaForCausalLM"),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW, tie_word_embeddings=False), "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1e6}), "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True), "Qwen3ForCausalLM"),
}
TOKENS = np.random.default_rng(0).integers(0, 97, (2, 3 * WINDOW + 1))  # longer than Mistral's window


# The helpers below run only in tests that took the fixtures above (which skip without torch and transformers).
def _hf_model(kind: str, seed: int = 0, **fields):
    """A random transformers model of ``kind``; biases and norm scales perturbed too (they start at 0 and 1)."""
    import torch
    import transformers
    config_cls, extra, _ = FAMILIES[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **fields})
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return hf


def _hf_logits(hf, tokens):
    import torch
    with torch.no_grad():
        return hf(torch.as_tensor(np.array(tokens))).logits.numpy()


def _logits(model, variables, tokens=TOKENS):
    return np.asarray(model.apply(variables, jnp.asarray(tokens, jnp.int32)))


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, transformers):
    """One family's transformers model, saved, and read back by load_hf."""
    kind = request.param
    hf = _hf_model(kind)
    folder = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(folder)
    model, variables = ffl.interop.load_hf(folder)
    return types.SimpleNamespace(kind=kind, hf=hf, folder=folder, model=model, variables=variables,
                                 want=_hf_logits(hf, TOKENS))


def test_config_fields_of_each_family(family):
    cfg = family.model.cfg
    assert (cfg.position, cfg.norm, cfg.activation, cfg.num_kv_heads) == ("rotary", "rmsnorm", "swiglu", 2)
    assert cfg.qk_norm == (family.kind == "qwen3") and cfg.head_dim == (32 if family.kind == "qwen3" else None)
    assert (cfg.qkv_bias, cfg.use_bias) == ((True, False) if family.kind == "qwen2" else (None, False))
    assert cfg.sliding_window == (WINDOW if family.kind == "mistral" else None)
    assert cfg.rope_scaling == (ffl.layers.RopeScaling("llama3", 4.0, 1.0, 4.0, 16) if family.kind == "llama"
                                else None)


def test_logits_match_transformers(family):
    np.testing.assert_allclose(_logits(family.model, family.variables), family.want, atol=1e-4, rtol=1e-4)


def test_greedy_generation_is_transformers_argmax_at_every_step(family):
    prompt, new = TOKENS[:, :4], 3 * WINDOW  # Mistral: the cache holds more keys than the window lets a query see
    out = np.asarray(ffl.generate(family.model, family.variables, prompt, new))
    steps = _hf_logits(family.hf, out)[:, prompt.shape[1] - 1:-1]
    np.testing.assert_array_equal(out[:, prompt.shape[1]:], steps.argmax(-1))


def test_round_trip_is_exact_both_ways(family, torch, transformers, tmp_path):
    ffl.interop.save_hf(family.model, family.variables, tmp_path)
    model, variables = ffl.interop.load_hf(tmp_path)
    assert model.cfg == family.model.cfg
    assert_same_tree(variables, family.variables)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(back).__name__ == FAMILIES[family.kind][2]
    want, got = family.hf.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    np.testing.assert_array_equal(_hf_logits(back, TOKENS), family.want)


@pytest.mark.parametrize("name,count", [("llama-3.2-1b", 1_235_814_400), ("qwen2.5-0.5b", 494_032_768),
                                        ("qwen3-0.6b", 596_049_920)])
def test_presets_have_the_published_parameter_counts(name, count):
    cfg = ffl.models.preset(name)
    model = ffl.models.GPT(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(shapes)) == count
    assert cfg.tie_embeddings
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


# the fields that matter of each published config.json (meta-llama/Llama-3.2-1B, Qwen/Qwen2.5-0.5B, Qwen/Qwen3-0.6B)
PUBLISHED = {
    "llama-3.2-1b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                     "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
                     "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                     "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "tie_word_embeddings": True,
                     "bos_token_id": 128000, "eos_token_id": 128001, "initializer_range": 0.02,
                     "torch_dtype": "bfloat16", "use_cache": True},
    "qwen2.5-0.5b": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936,
                     "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_act": "silu",
                     "max_position_embeddings": 32768, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
                     "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 24,
                     "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151643,
                     "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "bfloat16"},
    "qwen3-0.6b": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
                   "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28, "num_attention_heads": 16,
                   "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960,
                   "rms_norm_eps": 1e-06, "rope_theta": 1000000, "rope_scaling": None, "attention_bias": False,
                   "sliding_window": None, "use_sliding_window": False, "max_window_layers": 28,
                   "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
                   "attention_dropout": 0.0, "initializer_range": 0.02, "torch_dtype": "bfloat16"},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs_give_the_presets(name):
    assert config_from_hf(PUBLISHED[name]) == ffl.models.preset(name)


@pytest.mark.parametrize("name,scan", [("qwen3-tiny", False), ("qwen3-tiny", True), ("mistral-tiny", True)])
def test_every_param_has_logical_names(name, scan):
    import flax.linen as nn
    cfg = dataclasses.replace(ffl.models.preset(name), qkv_bias=True, scan_layers=scan)
    boxed = jax.eval_shape(lambda: ffl.models.GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    leaves = jax.tree_util.tree_flatten_with_path(boxed["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    assert all(isinstance(p, nn.LogicallyPartitioned) and len(p.names) == p.value.ndim for _, p in leaves)
    names = {"/".join(k.key for k in path[-2:]): p.names[scan:] for path, p in leaves}
    assert names["query/bias"] == ("heads", "head_dim") and names["value/bias"] == ("kv_heads", "head_dim")
    assert names.get("query_norm/scale") == (("head_dim",) if cfg.qk_norm else None)


@pytest.mark.parametrize("name", ["llama-tiny", "mistral-tiny", "qwen3-tiny"])
def test_small_presets_round_trip_their_config(name):
    cfg = ffl.models.preset(name)
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


@pytest.mark.parametrize("rope,max_positions", [({"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}, 64),
                                                ({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, 8)],
                         ids=["linear", "dynamic"])
def test_linear_and_dynamic_rope_scaling_match(transformers, rope, max_positions, tmp_path):
    # dynamic stretches only past max_position_embeddings (8): the 16 tokens go beyond it
    hf = _hf_model("llama", seed=3, rope_parameters=rope, max_position_embeddings=max_positions)
    hf.save_pretrained(tmp_path)
    model, variables = ffl.interop.load_hf(tmp_path)
    assert model.cfg.rope_scaling.rope_type == rope["rope_type"]
    np.testing.assert_allclose(_logits(model, variables), _hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


def test_sharded_and_bfloat16_folders(torch, transformers, tmp_path):
    hf = _hf_model("qwen3", seed=4)
    hf.save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").is_file()
    model, variables = ffl.interop.load_hf(tmp_path / "shards")
    np.testing.assert_allclose(_logits(model, variables), _hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)
    ffl.interop.save_hf(model, variables, tmp_path / "ours", max_shard_size=40_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "ours" / "model.safetensors").exists()
    assert_same_tree(ffl.interop.load_hf(tmp_path / "ours")[1], variables)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")  # as most published checkpoints are stored
    _, variables = ffl.interop.load_hf(tmp_path / "bf16")
    embedding = variables["params"]["embedder"]["token"]["embedding"]
    np.testing.assert_array_equal(embedding, hf.model.embed_tokens.weight.detach().float().numpy())


def _config(kind="llama", **fields):
    return {"model_type": kind, "architectures": [FAMILIES.get(kind, (0, 0, "X"))[2]], **COMMON, **fields}


@pytest.mark.parametrize("config,match", [
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "vocab_size": 10}, "load_hf supports"),
    (_config(num_local_experts=8), r"num_local_experts=8 is not supported; supported: absent \(mixture-of-experts"),
    (_config(kind="qwen3", num_experts=4), "num_experts=4"),
    (_config(sinks=True), r"sinks=True .*attention sinks"),
    (_config(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}),
     r"rope_parameters.rope_type='yarn' is not supported; supported: \['default', 'linear', 'dynamic', 'llama3'\]"),
    (_config(rope_scaling={"type": "longrope"}), r"rope_type='longrope'"),
    (_config(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    (_config(hidden_act="relu"), r"hidden_act='relu' is not supported; supported: \['gelu_pytorch_tanh', 'silu'\]"),
    (_config(attention_bias=True, mlp_bias=False), "mlp_bias=False"),
    (_config(kind="qwen3", attention_bias=True), "attention_bias=True"),
    (_config(kind="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
     r"max_window_layers=1 .*the same attention"),
    (_config(kind="mistral", layer_types=["full_attention", "sliding_attention"], sliding_window=4), "layer_types"),
    (_config(sliding_window=4), r"sliding_window=4 .*null for llama"),
])
def test_unsupported_fields_are_refused_before_any_weight_is_read(tmp_path, config, match):
    (tmp_path / "config.json").write_text(json.dumps(config))  # no weights: a later check would say so instead
    with pytest.raises(ValueError, match=match):
        ffl.interop.load_hf(tmp_path)


@pytest.mark.parametrize("fields,match", [
    ({"num_hidden_layers": 10**9}, r"config\.json num_hidden_layers=1000000000 is not supported; supported: an int "
                                   r"in \[1, 4096\]$"),
    ({"num_hidden_layers": 1e9}, r"num_hidden_layers=1000000000\.0 is not supported"),
    ({"vocab_size": 10**12}, r"vocab_size=1000000000000 is not supported; supported: an int in \[1, 16777216\]"),
    ({"num_attention_heads": 0}, r"num_attention_heads=0 is not supported"),
    ({"intermediate_size": [128] * 10**5}, r"intermediate_size=\[128, [0-9, ]*\.\.\. is not supported"),  # cut
    ({"hidden_size": "64"}, r"hidden_size='64' is not supported"),
    ({"num_key_value_heads": True}, r"num_key_value_heads=True is not supported; supported: an int in "
                                    r"\[1, 4096\] or null"),
    ({"head_dim": 0}, r"head_dim=0 is not supported"),
    ({"max_position_embeddings": None}, r"max_position_embeddings=None is not supported"),
    ({"num_key_value_heads": 3}, r"num_key_value_heads=3 is not supported; supported: a divisor of "
                                 r"num_attention_heads \(4\)"),
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True, "sliding_window": 4,
      "max_window_layers": "28"}, r"max_window_layers='28' is not supported"),
], ids=["layers-1e9", "layers-float", "vocab-1e12", "zero-heads", "list", "string", "bool", "zero-head-dim", "null",
        "kv-not-dividing", "window-layers-string"])
def test_config_sizes_are_checked_before_anything_is_read(tmp_path, fields, match):
    """Every size is a positive int within bounds, refused in one short line before the weights are even looked for
    (this folder has none) or anything is sized by it."""
    (tmp_path / "config.json").write_text(json.dumps(_config(**fields)))
    assert_config_refused_at_once(tmp_path, match)


@pytest.fixture(scope="module")
def zero_llama(tmp_path_factory):
    """A Llama folder of `_config`'s sizes (2 layers, vocab 97, width 64, 4 heads of 16, 2 kv heads, MLP 128) written
    by save_hf, with zero weights (init is only traced)."""
    model = ffl.models.GPT(config_from_hf(_config()))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), nn.unbox(shapes))
    return ffl.interop.save_hf(model, {"params": params}, tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("fields,match", [
    ({"num_hidden_layers": 1}, r"/llama: config\.json num_hidden_layers=1, but the weights hold 2 layers "
                               r"\(model\.layers\.0 \.\. model\.layers\.1\)$"),
    ({"num_hidden_layers": 3}, r"num_hidden_layers=3, but the weights hold 2 layers"),
    ({"vocab_size": 98}, r"config\.json vocab_size gives 98, but tensor model\.embed_tokens\.weight has shape "
                         r"\(97, 64\)$"),
    ({"hidden_size": 32}, r"hidden_size gives 32, but tensor model\.embed_tokens\.weight has shape \(97, 64\)"),
    ({"intermediate_size": 100}, r"intermediate_size gives 100, but tensor model\.layers\.0\.mlp\.gate_proj\.weight "
                                 r"has shape \(128, 64\)"),
    ({"head_dim": 8}, r"num_attention_heads \* head_dim gives 32, but tensor "
                      r"model\.layers\.0\.self_attn\.q_proj\.weight has shape \(64, 64\)"),
    ({"num_key_value_heads": 4}, r"num_key_value_heads \* head_dim gives 64, but tensor "
                                 r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \(32, 64\)"),
], ids=["fewer-layers", "more-layers", "vocab", "width", "mlp", "head-dim", "kv-heads"])
def test_config_sizes_must_match_the_weights(zero_llama, tmp_path, fields, match):
    """A size that disagrees with the tensors present (fewer or more layers than the weights hold, another
    vocabulary, width or head layout) names the key, its value and the tensor's shape, before the model is built."""
    folder = tmp_path / "llama"
    folder.mkdir()
    config = json.loads((zero_llama / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    (folder / "model.safetensors").symlink_to(zero_llama / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        ffl.interop.load_hf(folder)


@pytest.mark.parametrize("fields,model_type,match", [
    ({"norm": "layernorm"}, None, r"ModelConfig.norm='layernorm' .*LlamaForCausalLM .*\(accepted: 'rmsnorm'\)"),
    ({"use_bias": True, "qkv_bias": True}, "qwen2", r"use_bias=True .*Qwen2ForCausalLM"),
    ({"qk_norm": True}, "llama", r"qk_norm=True .*LlamaForCausalLM"),
    ({"sliding_window": 8}, "llama", r"sliding_window=8 .*\(accepted: None\)"),
    ({}, "falcon", r"model_type must be one of \['llama', 'mistral', 'qwen2', 'qwen3'\]"),
    ({"scan_layers": True}, None, "scan_layers"),
    ({"max_len": 64, "rope_scaling": ffl.layers.RopeScaling("dynamic", 2.0, original_max_len=8)}, None,
     r"max_len=64 with dynamic rope scaling: .* max_len = original_max_len \* factor = 16; set max_len to that"),
])
def test_save_hf_refuses_what_the_family_cannot_express(fields, model_type, match):
    cfg = dataclasses.replace(ffl.models.preset("llama-tiny"), **fields)
    with pytest.raises(ValueError, match=match):
        config_to_hf(cfg, model_type)


def test_families_chosen_for_export():
    tiny = ffl.models.preset("llama-tiny")
    kinds = {name: config_to_hf(dataclasses.replace(tiny, **fields))["model_type"] for name, fields in
             {"llama": {}, "mistral": {"sliding_window": 8}, "qwen2": {"qkv_bias": True},
              "qwen3": {"qk_norm": True, "head_dim": 64}}.items()}
    assert kinds == {k: k for k in kinds}


def test_rope_scaling_through_yaml_and_overrides(tmp_path):
    from flaxformer_lite.experiment import load_config, to_dict
    import yaml
    cfg = load_config(None, ["model.preset=llama-3.2-1b", "model.rope_scaling.factor=16"])
    assert cfg.model.rope_scaling == ffl.layers.RopeScaling("llama3", 16.0, 1.0, 4.0, 8192)  # the rest from the preset
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(tmp_path / "c.yaml") == cfg
    with pytest.raises(ValueError, match=r"unknown rope_scaling key 'beta'; valid keys: \['rope_type'"):
        load_config(None, ["model.preset=llama-tiny", "model.rope_scaling.beta=1"])
    with pytest.raises(ValueError, match=r"RopeScaling.rope_type must be one of \['linear', 'dynamic', 'llama3'\]"):
        load_config(None, ["model.preset=llama-tiny", "model.rope_scaling.rope_type=yarn"])
    with pytest.raises(ValueError, match="rope_scaling needs position='rotary'"):
        load_config(None, ["model.rope_scaling.rope_type=linear"])  # gpt-tiny: learned positions


def test_train_init_from_a_llama_folder_starts_at_its_weights(transformers, tmp_path):
    """train.py continues pre-training from a Hugging Face Llama folder, with its own tokenizer."""
    import importlib.util
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers

    from flaxformer_lite.pretrained import load_pretrained
    from flaxformer_lite.training import Checkpoints
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("train_cli_llama", root / "train.py")
    train_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "paper", "light", "green"]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = tmp_path / "hf"
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(hf)
    _hf_model("llama", seed=5).save_pretrained(hf)
    rng = np.random.default_rng(0)
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(60)))
    run = tmp_path / "run"
    assert train_cli.main([f"data.path={tmp_path / 'corpus.txt'}", f"train.init_from={hf}", "train.steps=1",
                           "optim.lr=0.0", "optim.weight_decay=0.0", "train.eval_every=0", "train.samples=0",
                           "train.seq_len=16", "train.batch_size=8", "train.progress=false",
                           f"train.run_dir={run}"]) == 0
    ckpt = Checkpoints(run / "checkpoints")
    params, _ = ckpt.restore_params()
    ckpt.close()
    assert_same_tree(params, load_pretrained(hf).params)
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    from flaxformer_lite.data.hf_tokenizer import StoreEncoder  # what the token store encoded the corpus with
    texts = ["alpha beta\n\ngamma", "river stone cloud unknown"]
    tokenizer = load_pretrained(hf).tokenizer
    assert StoreEncoder(tokenizer.proto).encode_batch(texts) == tokenizer.encode_batch(texts)
