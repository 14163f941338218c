"""HF import/export: folders written by transformers load here; ours load in transformers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from distil_jax import hf
from distil_jax import models
from tests.hf_utils import save_tiny, tiny_hf_model, torch_forward

TOL = 1e-5  # float32 max abs


def test_round_trip_through_transformers(tmp_path):
    ref_model = save_tiny(tmp_path / "src", seed=7, n_layer=3)
    config, params = hf.load_pretrained(tmp_path / "src")
    assert config.n_layer == 3 and config.vocab_size == 97
    ids = np.random.RandomState(0).randint(0, 97, (2, 10))
    ours = models.forward(config, params, ids).logits
    np.testing.assert_allclose(np.asarray(ours), torch_forward(ref_model, ids).logits.numpy(), rtol=0, atol=TOL)

    hf.save_pretrained(config, params, tmp_path / "out")
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                                   attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    np.testing.assert_array_equal(torch_forward(reloaded.eval(), ids).logits.numpy(),
                                  torch_forward(ref_model, ids).logits.numpy())


def test_untied_head_round_trip(tmp_path):
    ref_model = save_tiny(tmp_path / "src", seed=8, tie_word_embeddings=False)
    config, params = hf.load_pretrained(tmp_path / "src")
    assert "lm_head" in params
    hf.save_pretrained(config, params, tmp_path / "out")
    reloaded, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                                   attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = np.arange(12).reshape(2, 6)
    np.testing.assert_array_equal(torch_forward(reloaded.eval(), ids).logits.numpy(),
                                  torch_forward(ref_model, ids).logits.numpy())


def test_bfloat16_export_dtype_preserved(tmp_path):
    save_tiny(tmp_path / "src", seed=9)
    config, params = hf.load_pretrained(tmp_path / "src")
    hf.save_pretrained(config, params, tmp_path / "bf16", dtype=jnp.bfloat16)
    written = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert written.get("dtype", written.get("torch_dtype")) == "bfloat16"
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "bf16", dtype="auto", attn_implementation="eager")
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    _, back = hf.load_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert back["h"]["attn"]["c_attn"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(back["wte"]["embedding"], np.float32),
                                  np.asarray(params["wte"]["embedding"].astype(jnp.bfloat16), np.float32))


def test_pytorch_bin_and_sharded_safetensors(tmp_path):
    model = tiny_hf_model(seed=10)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _, sharded = hf.load_pretrained(tmp_path / "sharded")
    save_tiny(tmp_path / "single", seed=10)
    _, single = hf.load_pretrained(tmp_path / "single")
    np.testing.assert_array_equal(np.asarray(sharded["h"]["mlp"]["c_fc"]["kernel"][1]),
                                  np.asarray(single["h"]["mlp"]["c_fc"]["kernel"][1]))
    # pytorch_model.bin, written by hand (transformers 5 saves safetensors only).
    (tmp_path / "pt").mkdir()
    model.config.save_pretrained(tmp_path / "pt")
    torch.save(model.state_dict(), tmp_path / "pt" / "pytorch_model.bin")
    _, from_bin = hf.load_pretrained(tmp_path / "pt")
    np.testing.assert_array_equal(np.asarray(from_bin["wpe"]["embedding"]),
                                  np.asarray(single["wpe"]["embedding"]))


def test_error_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        hf.load_pretrained(tmp_path / "nope")


def test_error_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set"):
        hf.load_pretrained("someone/not-cached-model-xyz")


def test_error_missing_weights(tmp_path):
    (tmp_path / "m").mkdir()
    tiny_hf_model().config.save_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        hf.load_pretrained(tmp_path / "m")


def test_error_wrong_model_type(tmp_path):
    save_tiny(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.CheckpointError, match="unsupported model_type 'bert'"):
        hf.load_pretrained(tmp_path / "m")


def test_error_wrong_shape_and_missing_and_unexpected_keys(tmp_path):
    model = tiny_hf_model()
    config = hf.config_from_hf(model.config)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    bad = dict(state)
    bad["transformer.h.1.mlp.c_fc.weight"] = np.zeros((32, 7), np.float32)
    with pytest.raises(hf.CheckpointError, match=r"transformer.h.1.mlp.c_fc.weight: checkpoint \(32, 7\)"):
        hf.hf_state_dict_to_params(config, bad)
    bad = dict(state)
    del bad["transformer.ln_f.bias"]
    bad["transformer.h.0.attn.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(hf.CheckpointError, match="missing keys: transformer.ln_f.bias.*unexpected keys: "
                                                 "transformer.h.0.attn.extra.weight"):
        hf.hf_state_dict_to_params(config, bad)


def test_error_unsupported_option(tmp_path):
    save_tiny(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["reorder_and_upcast_attn"] = True
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.CheckpointError, match="reorder_and_upcast_attn"):
        hf.load_pretrained(tmp_path / "m")


def test_save_is_atomic(tmp_path, monkeypatch):
    """A failure while writing leaves no folder (and an existing export untouched)."""
    save_tiny(tmp_path / "src")
    config, params = hf.load_pretrained(tmp_path / "src")
    hf.save_pretrained(config, params, tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.flax.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_pretrained(config, params, tmp_path / "out")
    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_pretrained(config, params, tmp_path / "new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_file_is_a_one_line_error_naming_it(tmp_path, damage):
    save_tiny(tmp_path / "m", seed=3)
    f = tmp_path / "m" / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x00" * 64)
    with pytest.raises(hf.CheckpointError) as e:
        hf.load_pretrained(tmp_path / "m")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"cannot read the weights file {f}" in msg
    assert "corrupt or truncated" in msg


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_hf_layer_names_are_slices_of_the_stacked_leaves(family):
    """HF's `transformer.h.N.*` / `model.layers.N.*` tensor is slice N of the stacked leaf (both
    directions), compared against the torch module's own per-layer parameters."""
    from tests import llama_utils

    model = tiny_hf_model(seed=3, n_layer=3) if family == "gpt2" else llama_utils.tiny_hf_model("llama", seed=3)
    config = hf.config_from_hf(model.config)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = hf.hf_state_dict_to_params(config, state)
    if family == "gpt2":
        stacked, name = params["h"]["mlp"]["c_fc"]["kernel"], "transformer.h.{}.mlp.c_fc.weight"
        layer = lambda i: model.transformer.h[i].mlp.c_fc.weight  # noqa: E731  Conv1D [in, out]
    else:
        stacked, name = params["model"]["layers"]["mlp"]["up_proj"]["kernel"], "model.layers.{}.mlp.up_proj.weight"
        layer = lambda i: model.model.layers[i].mlp.up_proj.weight.T  # noqa: E731  Linear [out, in]
    assert stacked.shape[0] == config.num_layers >= 2
    for i in range(config.num_layers):
        np.testing.assert_array_equal(np.asarray(stacked[i]), layer(i).detach().numpy())
    back = hf.params_to_hf_state_dict(config, params)
    assert set(back) == {k for k in state if models.family(config).hf_to_path(k) is not None
                         and not (config.tie_word_embeddings and k == "lm_head.weight")}
    for i in range(config.num_layers):
        np.testing.assert_array_equal(np.asarray(back[name.format(i)]), state[name.format(i)])
