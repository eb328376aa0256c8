"""Hugging Face interop: parity with transformers' GPT2LMHeadModel, BertForPreTraining and BertModel (random
weights from a config, offline) within 1e-4; load -> save -> load exact, and transformers reads what we save;
sharded and PyTorch-pickle folders; clear errors. Only the tests that take the ``torch``/``transformers`` fixtures
need them: the config, size, missing-weight and save_hf refusals run without."""
import dataclasses
import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flaxformer_lite as ffl
from reference import (assert_config_refused_at_once, assert_same_tree, torch_fixture,  # noqa: F401 (fixtures)
                       transformers_fixture)

TOKENS = np.random.default_rng(0).integers(0, 97, (2, 12))
TYPES = np.concatenate([np.zeros((2, 6), int), np.ones((2, 6), int)], 1)
MASK = np.ones((2, 12), int)
MASK[1, 9:] = 0
BERT_CFG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=97,
                max_position_embeddings=32)


def _gpt2(torch, transformers, tmp_path, **save):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=97,
                                                              n_positions=32)).eval()  # ids 50256 > vocab
    hf.save_pretrained(tmp_path, **save)
    return hf


def _logits(model, variables, tokens=TOKENS):
    return np.asarray(model.apply(variables, jnp.asarray(tokens, jnp.int32)))


def test_gpt2_parity_and_round_trip(torch, transformers, tmp_path):
    hf = _gpt2(torch, transformers, tmp_path / "hf")
    with pytest.warns(UserWarning, match=r"eos_token_id=50256 is outside the vocabulary \(97 ids\); using 96"):
        model, variables = ffl.interop.load_hf(tmp_path / "hf")
    assert (model.cfg.bos_id, model.cfg.eos_id, model.cfg.pad_id) == (96, 96, 96)
    with torch.no_grad():
        want = hf(torch.as_tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(_logits(model, variables), want, atol=1e-4, rtol=1e-4)
    ffl.interop.save_hf(model, variables, tmp_path / "ours")
    model2, variables2 = ffl.interop.load_hf(tmp_path / "ours")
    assert model2.cfg == model.cfg
    assert_same_tree(variables2, variables)  # exact round trip
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.as_tensor(TOKENS)).logits.numpy(), want, atol=1e-5)


def test_gpt2_from_pytorch_pickle_and_shards(torch, transformers, tmp_path):
    hf = _gpt2(torch, transformers, tmp_path / "hf")
    (tmp_path / "bin").mkdir()  # an older checkpoint: a PyTorch pickle (read with weights_only=True)
    hf.config.save_pretrained(tmp_path / "bin")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    model, variables = ffl.interop.load_hf(tmp_path / "bin")
    with torch.no_grad():
        want = hf(torch.as_tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(_logits(model, variables), want, atol=1e-4, rtol=1e-4)
    hf.save_pretrained(tmp_path / "shards", max_shard_size="100KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    np.testing.assert_allclose(_logits(*ffl.interop.load_hf(tmp_path / "shards")), want, atol=1e-4, rtol=1e-4)


def test_bert_for_pretraining_parity_and_round_trip(torch, transformers, tmp_path):
    torch.manual_seed(1)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**BERT_CFG)).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, variables = ffl.interop.load_hf(tmp_path / "hf")
    with torch.no_grad():
        want = hf(torch.as_tensor(TOKENS), token_type_ids=torch.as_tensor(TYPES),
                  attention_mask=torch.as_tensor(MASK), output_hidden_states=True)
    out = model.apply(variables, jnp.asarray(TOKENS, jnp.int32), token_type_ids=jnp.asarray(TYPES, jnp.int32),
                      padding_mask=jnp.asarray(MASK, bool))
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(out.hidden)[real], want.hidden_states[-1].numpy()[real], atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.mlm_logits)[real], want.prediction_logits.numpy()[real], atol=1e-4)
    np.testing.assert_allclose(out.nsp_logits, want.seq_relationship_logits.numpy(), atol=1e-4)
    ffl.interop.save_hf(model, variables, tmp_path / "ours")
    _, variables2 = ffl.interop.load_hf(tmp_path / "ours")
    assert_same_tree(variables2, variables)
    back = transformers.BertForPreTraining.from_pretrained(tmp_path / "ours").eval()  # transformers reads ours
    with torch.no_grad():
        again = back(torch.as_tensor(TOKENS), token_type_ids=torch.as_tensor(TYPES),
                     attention_mask=torch.as_tensor(MASK))
    np.testing.assert_allclose(again.prediction_logits.numpy()[real], want.prediction_logits.numpy()[real], atol=1e-5)
    np.testing.assert_allclose(again.seq_relationship_logits.numpy(), want.seq_relationship_logits.numpy(), atol=1e-5)


def test_bert_model_without_prefix_initialises_missing_heads(torch, transformers, tmp_path):
    torch.manual_seed(2)
    hf = transformers.BertModel(transformers.BertConfig(**BERT_CFG)).eval()
    hf.save_pretrained(tmp_path)
    names = json.loads((tmp_path / "config.json").read_text())["architectures"]
    assert names == ["BertModel"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, variables = ffl.interop.load_hf(tmp_path)
    assert any("freshly initialised" in str(w.message) and "cls.predictions" in str(w.message) for w in caught)
    with torch.no_grad():
        want = hf(torch.as_tensor(TOKENS), token_type_ids=torch.as_tensor(TYPES), attention_mask=torch.as_tensor(MASK))
    out = model.apply(variables, jnp.asarray(TOKENS, jnp.int32), token_type_ids=jnp.asarray(TYPES, jnp.int32),
                      padding_mask=jnp.asarray(MASK, bool))
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(out.hidden)[real], want.last_hidden_state.numpy()[real], atol=1e-4)
    np.testing.assert_allclose(out.pooled, want.pooler_output.numpy(), atol=1e-4)


def test_gpt2_base_model_without_prefix(torch, transformers, tmp_path):
    """A ``GPT2Model`` folder names its tensors without ``transformer.`` (``h.0.attn...``, ``wte.weight``): the
    same weights as the LM model's, tied output."""
    hf = _gpt2(torch, transformers, tmp_path / "lm")
    hf.transformer.save_pretrained(tmp_path / "base")
    assert json.loads((tmp_path / "base" / "config.json").read_text())["architectures"] == ["GPT2Model"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eos/bos ids outside the tiny vocabulary
        model, variables = ffl.interop.load_hf(tmp_path / "base")
    with torch.no_grad():
        want = hf(torch.as_tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(_logits(model, variables), want, atol=1e-4, rtol=1e-4)


def test_bert_for_masked_lm_has_no_pooler(torch, transformers, tmp_path):
    """``BertForMaskedLM`` is built without a pooler: it is freshly initialised with a warning, the MLM logits
    match."""
    torch.manual_seed(3)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**BERT_CFG)).eval()
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, variables = ffl.interop.load_hf(tmp_path)
    assert any("freshly initialised" in str(w.message) and "bert.pooler" in str(w.message) for w in caught)
    with torch.no_grad():
        want = hf(torch.as_tensor(TOKENS), token_type_ids=torch.as_tensor(TYPES),
                  attention_mask=torch.as_tensor(MASK)).logits.numpy()
    out = model.apply(variables, jnp.asarray(TOKENS, jnp.int32), token_type_ids=jnp.asarray(TYPES, jnp.int32),
                      padding_mask=jnp.asarray(MASK, bool))
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(out.mlm_logits)[real], want[real], atol=1e-4)


@pytest.mark.parametrize("config,match", [
    ("{not json", r"config\.json: not valid JSON"),
    ([1, 2], "must hold a JSON object"),
    ({"model_type": "gpt2"}, "has no vocab_size"),
    ({"model_type": "bert", "vocab_size": 10, "tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]}, "load_hf supports"),
    ({"model_type": "bert", "vocab_size": 10, "position_embedding_type": "relative_key"}, "position_embedding_type"),
    ({"model_type": "bert", "vocab_size": 10, "hidden_act": "mish"}, "hidden_act='mish' is not supported"),
    ({"model_type": "gpt2", "vocab_size": 10, "scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse"),
])
def test_unsupported_configs_raise(tmp_path, config, match):
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(ValueError, match=match):
        ffl.interop.load_hf(tmp_path)


GPT2_SIZES = {"model_type": "gpt2", "vocab_size": 10, "n_layer": 1, "n_head": 2, "n_embd": 8, "n_positions": 8,
              "bos_token_id": 0, "eos_token_id": 0}
BERT_SIZES = {"model_type": "bert", "vocab_size": 10, "num_hidden_layers": 1, "num_attention_heads": 2,
              "hidden_size": 8, "intermediate_size": 16, "max_position_embeddings": 8}


@pytest.mark.parametrize("config,match", [
    ({**GPT2_SIZES, "n_layer": 10**9}, r"config\.json n_layer=1000000000 is not supported; supported: an int in "
                                      r"\[1, 4096\]$"),
    ({**GPT2_SIZES, "n_layer": 1e9}, r"n_layer=1000000000\.0 is not supported"),
    ({**GPT2_SIZES, "vocab_size": 10**12}, r"vocab_size=1000000000000 is not supported; supported: an int in "
                                           r"\[1, 16777216\]"),
    ({**GPT2_SIZES, "n_head": 0}, r"n_head=0 is not supported"),
    ({**GPT2_SIZES, "n_embd": list(range(10**5))}, r"n_embd=\[0, 1, 2, [0-9, ]*\.\.\. is not supported"),  # cut
    ({**GPT2_SIZES, "n_positions": "1024"}, r"n_positions='1024' is not supported"),
    ({**GPT2_SIZES, "n_layer": True}, r"n_layer=True is not supported"),
    ({**GPT2_SIZES, "n_layer": None}, r"n_layer=None is not supported"),
    ({**GPT2_SIZES, "n_inner": -4}, r"n_inner=-4 is not supported; supported: an int in \[1, 1048576\] or null"),
    ({**GPT2_SIZES, "n_head": 3}, r"config\.json n_head=3 does not divide n_embd=8"),
    ({**GPT2_SIZES, "eos_token_id": [0]}, r"eos_token_id=\[0\] is not supported; supported: an int id or null"),
    ({**GPT2_SIZES, "activation_function": ["gelu"]}, r"activation_function=\['gelu'\] is not supported"),
    ({**BERT_SIZES, "num_hidden_layers": 10**9}, r"num_hidden_layers=1000000000 is not supported"),
    ({**BERT_SIZES, "type_vocab_size": 2.0}, r"type_vocab_size=2\.0 is not supported"),
    ({**BERT_SIZES, "num_attention_heads": 3}, r"num_attention_heads=3 does not divide hidden_size=8"),
    ('{"model_type": "gpt2", "vocab_size": 1' + "0" * 5000 + "}", r"config\.json: not valid JSON \(Exceeds"),
], ids=["layers-1e9", "layers-float", "vocab-1e12", "zero-heads", "list", "string", "bool", "null", "negative",
        "heads-not-dividing", "id-list", "activation-list", "bert-layers", "bert-float", "bert-heads", "5000-digits"])
def test_config_sizes_are_checked_before_anything_is_read(tmp_path, config, match):
    """Every size is a positive int within bounds, refused in one short line before the weights are even looked for
    (this folder has none) or anything is sized by it."""
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert_config_refused_at_once(tmp_path, match)


@pytest.fixture(scope="module")
def zero_folders(tmp_path_factory):
    """GPT-2 and BERT folders of 2 layers (vocab 10, width 8, MLP 16, 8 positions) written by save_hf, with zero
    weights (init is only traced)."""
    common = dict(vocab_size=10, num_layers=2, num_heads=2, embed_dim=8, mlp_dim=16, max_len=8, pad_id=0, bos_id=0,
                  eos_id=0)
    models = {"gpt2": ffl.models.GPT(ffl.models.ModelConfig(**common)),
              "bert": ffl.models.BERT(ffl.models.ModelConfig(model="bert", type_vocab_size=2, norm_position="post",
                                                             embed_norm=True, activation="gelu", **common))}
    folders = {}
    for kind, model in models.items():
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
        params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), nn.unbox(shapes))
        folders[kind] = ffl.interop.save_hf(model, {"params": params}, tmp_path_factory.mktemp(kind))
    return folders


@pytest.mark.parametrize("kind,fields,match", [
    ("gpt2", {"n_layer": 1}, r"/gpt2\d*: config\.json n_layer=1, but the weights hold 2 layers \(transformer\.h\.0 "
                             r"\.\. transformer\.h\.1\)$"),
    ("gpt2", {"n_layer": 3}, r"n_layer=3, but the weights hold 2 layers"),
    ("gpt2", {"vocab_size": 11}, r"config\.json vocab_size gives 11, but tensor transformer\.wte\.weight has shape "
                                 r"\(10, 8\)$"),
    ("gpt2", {"n_positions": 16}, r"n_positions gives 16, but tensor transformer\.wpe\.weight has shape \(8, 8\)"),
    ("gpt2", {"n_inner": 32}, r"n_inner gives 32, but tensor transformer\.h\.0\.mlp\.c_fc\.weight has shape "
                              r"\(8, 16\)"),
    ("gpt2", {"n_embd": 16, "n_inner": 16}, r"n_embd gives 16, but tensor transformer\.wte\.weight has shape "
                                            r"\(10, 8\)"),
    ("bert", {"num_hidden_layers": 1}, r"num_hidden_layers=1, but the weights hold 2 layers \(bert\.encoder\.layer\.0"),
    ("bert", {"type_vocab_size": 3}, r"type_vocab_size gives 3, but tensor bert\.embeddings\.token_type_embeddings"),
    ("bert", {"intermediate_size": 12}, r"intermediate_size gives 12, but tensor "
                                        r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight has shape \(16, 8\)"),
], ids=["fewer-layers", "more-layers", "vocab", "positions", "mlp", "width", "bert-fewer-layers", "bert-type-vocab",
        "bert-mlp"])
def test_config_sizes_must_match_the_weights(zero_folders, tmp_path, kind, fields, match):
    """A size that disagrees with the tensors present (fewer or more layers than the weights hold, another
    vocabulary or width) names the key, its value and the tensor's shape, before the model is built."""
    config = json.loads((zero_folders[kind] / "config.json").read_text())
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, **fields}))
    (folder / "model.safetensors").symlink_to(zero_folders[kind] / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        ffl.interop.load_hf(folder)


def test_missing_or_misshapen_files_raise(tmp_path):
    from safetensors.numpy import save_file
    with pytest.raises(ValueError, match="no config.json"):
        ffl.interop.load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "n_layer": 1,
                                                      "n_head": 2, "n_embd": 8, "n_positions": 8,
                                                      "bos_token_id": 0, "eos_token_id": 0}))
    with pytest.raises(ValueError, match="no model.safetensors"):
        ffl.interop.load_hf(tmp_path)
    save_file({"transformer.h.0.attn.c_attn.weight": np.zeros((8, 20), np.float32)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"c_attn\.weight has shape \(8, 20\), but config\.json needs \(8, 24\)"):
        ffl.interop.load_hf(tmp_path)


@pytest.mark.parametrize("kind,drop,match", [
    ("gpt2", ["transformer.ln_f.weight"], r"/gpt2: weights missing for \['transformer\.ln_f\.weight'\]$"),
    ("gpt2", [f"transformer.h.1.{name}.{part}" for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")
              for part in ("weight", "bias")],
     r"weights missing for \['transformer\.h\.1\.attn\.c_attn\.weight', .*\] \(and 1 more\)$"),
    ("bert", ["cls.predictions.bias", "bert.pooler.dense.weight", "bert.encoder.layer.1.output.dense.bias"],
     r"/bert: weights missing for \['bert\.encoder\.layer\.1\.output\.dense\.bias'\]$"),
], ids=["gpt2-one", "gpt2-six", "bert-beside-heads"])
def test_load_hf_names_missing_weights(zero_folders, tmp_path, kind, drop, match):
    """A tensor the model needs that the folder lacks (its sizes all agreeing) is named, the first five and a count
    of the rest, before anything is built; missing BERT heads are not named (they are freshly initialised)."""
    from safetensors.numpy import load_file, save_file
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "config.json").write_text((zero_folders[kind] / "config.json").read_text())
    tensors = load_file(str(zero_folders[kind] / "model.safetensors"))
    assert set(drop) <= set(tensors)
    save_file({name: x for name, x in tensors.items() if name not in drop}, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        ffl.interop.load_hf(folder)


@pytest.mark.parametrize("index", [{"metadata": {"total_size": 0}},
                                   {"weight_map": ["model-00001-of-00001.safetensors"]},
                                   ["model-00001-of-00001.safetensors"]],
                         ids=["no-weight-map", "weight-map-list", "not-an-object"])
def test_a_shard_index_without_weight_map_is_refused(tmp_path, index):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_SIZES))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: no weight_map object$"):
        ffl.interop.load_hf(tmp_path)


@pytest.mark.parametrize("held,said", [  # held: what is pickled, made from torch
    (lambda torch: [torch.zeros(10, 8)], "holds a list, where a PyTorch state dict (tensor name -> tensor"),
    (lambda torch: 7, "holds an int, where a PyTorch state dict"),
    (lambda torch: {"transformer.wte.weight": "zeros"}, "holds a dict whose entry 'transformer.wte.weight' is a str, "
                                                        "where"),
    (lambda torch: {"state_dict": {"transformer.wte.weight": torch.zeros(10, 8)}},
     "holds a dict whose entry 'state_dict' is a dict, where"),  # a training checkpoint
    (lambda torch: {0: torch.zeros(10, 8)}, "holds a dict with the key 0, where"),
    (lambda torch: {"transformer.wte.weight": torch.zeros(10, 8).to_sparse()},
     "tensor 'transformer.wte.weight' (torch.float32, torch.sparse_coo) has no NumPy form"),
], ids=["list", "int", "dict-of-strings", "nested-state-dict", "int-key", "sparse"])
def test_a_pickle_holding_no_tensor_dict_is_one_line(torch, tmp_path, held, said):
    """A weights-only pickle that loads but is no state dict names the file and what it holds, in one line."""
    (tmp_path / "config.json").write_text(json.dumps(GPT2_SIZES))
    torch.save(held(torch), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        ffl.interop.load_hf(tmp_path)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'pytorch_model.bin'}: {said}") and "\n" not in message, message


@pytest.mark.parametrize("fields,match", [
    ({"model": "bert", "share_layers": True}, "share_layers"),
    ({"model": "bert", "table_dim": 16}, "table_dim"),
    ({"model": "gpt", "talking_heads": True}, "talking_heads"),
    ({"model": "gpt", "attention": "synthesizer_dense"}, "attention"),
    ({"model": "gpt", "num_kv_heads": 2}, "num_kv_heads"),
    ({"model": "gpt", "scan_layers": True}, "scan_layers"),
    ({"model": "gpt", "embed_norm": True}, r"embed_norm=True .*\(accepted: False\)"),
    ({"model": "bert", "embed_norm": False}, r"embed_norm=False .*\(accepted: True\)"),
    ({"model": "gpt", "type_vocab_size": 2}, r"type_vocab_size=2 .*\(accepted: 0\)"),
    ({"model": "bert", "type_vocab_size": 0}, r"type_vocab_size=0 .*\(accepted: an int >= 1\)"),
    ({"model": "gpt", "activation": "silu"}, r"activation='silu' .*\(accepted: 'gelu', 'gelu_tanh', 'relu'\)"),
    ({"model": "bert", "activation": "swiglu"}, r"activation='swiglu'"),
    ({"model": "bert", "tie_embeddings": False}, "tie_embeddings"),
    ({"model": "gpt", "qk_norm": True}, r"qk_norm=True .*\(accepted: False\)"),
    ({"model": "bert", "qk_norm": True}, "qk_norm"),
    ({"model": "gpt", "sliding_window": 4}, r"sliding_window=4 .*\(accepted: None\)"),
    ({"model": "gpt", "qkv_bias": False}, r"qkv_bias=False .*\(accepted: None, True\)"),
    ({"model": "bert", "qkv_bias": False}, "qkv_bias"),
])
def test_save_hf_refuses_what_the_layout_cannot_express(tmp_path, fields, match):
    from flaxformer_lite.interop.hf import config_to_hf
    from flaxformer_lite.models import ModelConfig
    base = {"gpt": dict(norm_position="pre"), "bert": dict(norm_position="post", type_vocab_size=2,
                                                              activation="gelu", embed_norm=True)}[fields["model"]]
    assert config_to_hf(ModelConfig(**base, model=fields["model"]))  # only the one field is at fault
    cfg = ModelConfig(**{**base, **fields})
    with pytest.raises(ValueError, match=match):
        config_to_hf(cfg)


def test_save_hf_model_type_must_name_the_models_layout():
    """``model_type="bert"`` for a GPT (or ``"gpt2"`` for a BERT) is refused, not written in the model's own
    layout under the name asked for."""
    from flaxformer_lite.interop.hf import config_to_hf
    from flaxformer_lite.models import ModelConfig
    gpt = ModelConfig(norm_position="pre")
    bert = ModelConfig(model="bert", norm_position="post", type_vocab_size=2, activation="gelu", embed_norm=True)
    assert config_to_hf(gpt, "gpt2")["model_type"] == "gpt2" and config_to_hf(bert, "bert")["model_type"] == "bert"
    with pytest.raises(ValueError, match=r"model_type='bert' cannot write cfg\.model='gpt' \(accepted: 'gpt2' or "
                                         r"None\)"):
        config_to_hf(gpt, "bert")
    with pytest.raises(ValueError, match=r"model_type='gpt2' cannot write cfg\.model='bert'"):
        config_to_hf(bert, "gpt2")


@pytest.mark.parametrize("cfg", [
    dataclasses.replace(ffl.models.preset("gpt2-small"), pad_id=0, init_std=0.01, tie_embeddings=False),
    ffl.models.preset("bert-tiny"),  # bos_id=101, eos_id=102
])
def test_config_round_trip_is_exact(cfg):
    from flaxformer_lite.interop.hf import config_from_hf, config_to_hf
    assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg)))) == cfg


@pytest.mark.parametrize("edit,match", [
    (lambda params: {"params": {}}, r"missing: \['decoder/layer_0/.*\] \(and \d+ more\)"),
    (lambda params: {"params": {**params, "extra": np.zeros(3)}}, r"unexpected: \['extra'\]"),
    (lambda params: {"params": {**params, "embedder": {**params["embedder"],
                                                       "token": {"embedding": np.zeros((11, 8))}}}},
     r"wrong shape: \['embedder/token/embedding \(11, 8\) \(model: \(10, 8\)\)'\]"),
    (lambda params: {"cache": {}}, r"'params' collection .*got keys \['cache'\]"),
], ids=["empty", "extra", "wrong-shape", "no-params"])
def test_save_hf_refuses_variables_unlike_the_model(tmp_path, edit, match):
    model = ffl.models.GPT(ffl.models.ModelConfig(vocab_size=10, num_layers=1, num_heads=2, embed_dim=8, mlp_dim=16,
                                                  max_len=8))
    shapes = nn.unbox(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"])
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)  # the right tree, without running init
    ffl.interop.save_hf(model, {"params": params}, tmp_path / "ok")  # the unedited tree is accepted
    with pytest.raises(ValueError, match=match):
        ffl.interop.save_hf(model, edit(params), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything
