"""Checkpoint formats: official `.pt`, HF directories (single and sharded), rgemma's own
format; conversions, config mapping, meta-device loading, and the errors of bad inputs.

Oracles: the official `recurrentgemma.torch.Griffin` (logits of a `.pt` it wrote) and HF
`RecurrentGemmaForCausalLM` (logits of a directory its `save_pretrained` wrote).

HF's local attention with `attention_window_size = W` lets a query see W keys, the
official one W + 1 (itself and the W before it). A HF model therefore agrees with the
official model / rgemma on the same weights only for sequences of at most W tokens; to
compare beyond, the HF model is built with window W + 1 and rgemma with W. Only
full-sequence forwards with `use_cache=False` are compared: HF's cache and left padding
are known to be inexact.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from oracle import random_official

from rgemma import checkpoint as ck
from rgemma.config import PRESETS, GriffinConfig
from rgemma.errors import CheckpointError, ConfigError
from rgemma.model import Griffin

CFG = GriffinConfig.preset("test-tiny")  # R, R, A; width 32, lru 40, window 8
W = CFG.attention_window_size
T = 3 * W + 2  # longer than the window


def _hf():
    warnings.filterwarnings("ignore")
    return pytest.importorskip("transformers", reason="transformers not installed")


def _tokens(t: int = T, b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (b, t), generator=g)


@torch.no_grad()
def _logits(model: Griffin, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)[0]


@torch.no_grad()
def _official_logits(official, tokens: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1]).expand_as(tokens)
    return official(tokens, pos)[0].float()


@torch.no_grad()
def _hf_logits(hf_model, tokens: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=tokens, use_cache=False).logits.float()


def _random_hf(cfg: GriffinConfig, seed: int = 0, window: int | None = None):
    """A HF RecurrentGemmaForCausalLM for `cfg` with random weights of a noticeable size
    (built from our `griffin_to_hf_config`, which HF must accept)."""
    transformers = _hf()
    hf_cfg = ck.griffin_to_hf_config(cfg)
    if window is not None:
        hf_cfg["attention_window_size"] = window
    torch.manual_seed(seed)
    model = transformers.RecurrentGemmaForCausalLM(
        transformers.RecurrentGemmaConfig.from_dict(hf_cfg)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("recurrent_param"):
                p.uniform_(-2.0, 3.0)
            elif name != "lm_head.weight":  # tied to the embedding
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def official():
    return random_official(CFG, seed=3)


@pytest.fixture(scope="module")
def official_pt(official, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("official") / "test-tiny.pt"
    torch.save(official.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def hf_model():
    return _random_hf(CFG, seed=4)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hf") / "single"
    hf_model.save_pretrained(path)
    return str(path)


# ----------------------------------------------------------------------------------
# Official .pt
# ----------------------------------------------------------------------------------
def test_official_pt_gives_official_logits(official, official_pt):
    model = ck.load_model(official_pt, config=CFG)
    assert model.source == {
        "format": "official",
        "path": official_pt,
        "tokenizer": None,
        "bundled": False,
    }
    assert model.config == CFG
    tokens = _tokens()
    torch.testing.assert_close(
        _logits(model, tokens), _official_logits(official, tokens), atol=1e-4, rtol=0
    )


def test_kaggle_wrapped_pt_in_directory_with_tokenizer(official, tmp_path):
    torch.save({"model": official.state_dict()}, tmp_path / "2b.pt")
    (tmp_path / "tokenizer.model").write_bytes(b"sentencepiece")
    model = ck.load_model(tmp_path, config=CFG)
    assert model.source["format"] == "official"
    assert model.source["tokenizer"] == str(tmp_path / "tokenizer.model")
    for name, p in official.state_dict().items():
        assert torch.equal(model.state_dict()[name], p), name


def test_config_inferred_from_shapes(official, official_pt):
    inferred = GriffinConfig.from_state_dict(
        official.state_dict(),
        attention_window_size=W,
        embeddings_scale_by_sqrt_dim=CFG.embeddings_scale_by_sqrt_dim,
        logits_soft_cap=CFG.logits_soft_cap,
    )
    assert inferred == CFG
    # Without a declared config, what shapes cannot tell takes RecurrentGemma's values.
    assert ck.load_model(official_pt).config == dataclasses.replace(CFG, attention_window_size=2048)


@pytest.mark.parametrize(
    "field,value", [("mlp_expanded_width", 64), ("lru_width", 64), ("num_heads", 4)]
)
def test_declared_config_mismatch_names_field(official_pt, field, value):
    declared = dataclasses.replace(CFG, **{field: value})
    with pytest.raises(ConfigError, match=field):
        ck.load_model(official_pt, config=declared)


# ----------------------------------------------------------------------------------
# HF directories
# ----------------------------------------------------------------------------------
def test_hf_save_pretrained_gives_hf_logits_within_window(hf_model, hf_dir):
    model = ck.load_model(hf_dir)
    assert model.source["format"] == "hf"
    assert model.config == CFG
    tokens = _tokens(t=W)  # HF (W keys) and official (W + 1 keys) agree up to W tokens
    torch.testing.assert_close(
        _logits(model, tokens), _hf_logits(hf_model, tokens), atol=1e-4, rtol=0
    )


def test_hf_with_window_plus_one_matches_beyond_window(tmp_path):
    """HF with window W + 1 sees W + 1 keys, as the official model with window W."""
    hf_model = _random_hf(CFG, seed=5, window=W + 1)
    hf_model.save_pretrained(tmp_path)
    loaded = ck.load_model(tmp_path)
    assert loaded.config.attention_window_size == W + 1  # the number is kept as is
    ours = Griffin(CFG, device="meta")
    ours.load_state_dict(loaded.state_dict(), assign=True)
    tokens = _tokens()
    torch.testing.assert_close(
        _logits(ours.eval(), tokens), _hf_logits(hf_model, tokens), atol=1e-4, rtol=0
    )


def test_hf_sharded_with_index(hf_model, hf_dir, tmp_path):
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    sharded = ck.load_model(tmp_path)
    single = ck.load_model(hf_dir)
    for name, p in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], p), name

    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        ck.load_model(tmp_path)


def test_official_and_hf_formats_of_same_weights(official, official_pt, tmp_path):
    """The same weights as official `.pt` and as a HF directory give identical logits, and
    HF's own model on that directory gives the official logits (within its window)."""
    transformers = _hf()
    from_pt = ck.load_model(official_pt, config=CFG)
    hf_path = ck.save_hf(from_pt, tmp_path / "hf")
    from_hf = ck.load_model(hf_path)
    tokens = _tokens()
    assert torch.equal(_logits(from_hf, tokens), _logits(from_pt, tokens))

    hf_model = transformers.RecurrentGemmaForCausalLM.from_pretrained(hf_path).eval()
    short = tokens[:, :W]
    torch.testing.assert_close(
        _hf_logits(hf_model, short), _official_logits(official, short), atol=1e-4, rtol=0
    )


# ----------------------------------------------------------------------------------
# Key maps and config maps
# ----------------------------------------------------------------------------------
def test_key_map_matches_hf_names_and_round_trips(official, hf_model):
    sd = official.state_dict()
    hf_sd = ck.official_to_hf(sd)
    expected = {k: v.shape for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    assert {k: v.shape for k, v in hf_sd.items()} == expected
    assert all(v.is_contiguous() for v in hf_sd.values())
    back = ck.hf_to_official(hf_sd, CFG.num_layers)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    # conv: transpose, no flip; MLP: w[0].T / w[1].T
    w = sd["blocks.0.recurrent_block.conv_1d.w"]  # (k, e)
    assert torch.equal(hf_sd["model.layers.0.temporal_block.conv_1d.weight"][:, 0, :], w.T)
    up = sd["blocks.0.mlp_block.ffw_up.w"]
    assert torch.equal(hf_sd["model.layers.0.mlp_block.up_proj.weight"], up[1].T)
    # A bare RecurrentGemmaModel (no "model." prefix) converts too.
    bare = {k.removeprefix("model."): v for k, v in hf_sd.items()}
    assert ck.hf_to_official(bare).keys() == sd.keys()


def test_key_map_errors(official):
    sd = dict(official.state_dict())
    with pytest.raises(CheckpointError, match="blocks.0.bogus"):
        ck.official_to_hf({**sd, "blocks.0.bogus": torch.zeros(1)})
    hf_sd = ck.official_to_hf(sd)
    with pytest.raises(CheckpointError, match="model.layers.1.temporal_block.bogus"):
        ck.hf_to_official({**hf_sd, "model.layers.1.temporal_block.bogus": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="model.layers.7.channel_pre_norm.weight"):
        ck.hf_to_official(
            {**hf_sd, "model.layers.7.channel_pre_norm.weight": torch.zeros(32)}, CFG.num_layers
        )
    no_up = {k: v for k, v in hf_sd.items() if k != "model.layers.2.mlp_block.up_proj.weight"}
    with pytest.raises(CheckpointError, match="model.layers.2.mlp_block.up_proj.weight"):
        ck.hf_to_official(no_up)
    # A tied lm_head equal to the embedding is dropped; a different one is refused.
    tied = {**hf_sd, "lm_head.weight": hf_sd["model.embed_tokens.weight"].clone()}
    assert "lm_head.weight" not in ck.hf_to_official(tied)
    untied = {**hf_sd, "lm_head.weight": hf_sd["model.embed_tokens.weight"] + 1}
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        ck.hf_to_official(untied)


# The real google/recurrentgemma-2b config.json (transformers 4.40 era).
HF_2B_CONFIG_JSON = {
    "_block_types": ["recurrent", "recurrent", "attention"],
    "architectures": ["RecurrentGemmaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attention_window_size": 2048,
    "conv1d_width": 4,
    "embeddings_scale_by_sqrt_dim": True,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2560,
    "intermediate_size": 15360,
    "logits_soft_cap": 30.0,
    "lru_width": 2560,
    "model_type": "recurrent_gemma",
    "num_attention_heads": 10,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "vocab_size": 256000,
}


def test_hf_config_mapping():
    transformers = _hf()
    assert ck.hf_config_to_griffin(HF_2B_CONFIG_JSON) == PRESETS["recurrentgemma-2b"]
    for name, cfg in PRESETS.items():
        assert ck.hf_config_to_griffin(ck.griffin_to_hf_config(cfg)) == cfg, name
    # HF's own config object (HF 5 keeps rope settings in rope_parameters), and HF's
    # intermediate_size is twice the MLP width of the model it builds.
    hf_cfg = transformers.RecurrentGemmaConfig.from_dict(ck.griffin_to_hf_config(CFG))
    assert hf_cfg.intermediate_size == 2 * CFG.mlp_expanded_width
    assert ck.hf_config_to_griffin(hf_cfg.to_dict()) == CFG
    assert ck.hf_config_to_griffin(hf_cfg) == CFG

    bad = [
        ({"partial_rotary_factor": 1.0}, "partial_rotary_factor"),
        ({"num_key_value_heads": 10}, "num_key_value_heads"),
        ({"intermediate_size": 15361}, "intermediate_size"),
        ({"model_type": "gemma"}, "model_type"),
        ({"rms_norm_eps": 1e-5}, "rms_norm_eps"),
        ({"hidden_size": None}, "hidden_size"),
    ]
    for change, field in bad:
        with pytest.raises(ConfigError, match=field):
            ck.hf_config_to_griffin({**HF_2B_CONFIG_JSON, **change})


def test_preset_parameter_counts():
    for name, count in [("recurrentgemma-2b", 2_682_862_080), ("recurrentgemma-9b", 8_579_977_216)]:
        cfg = GriffinConfig.preset(name)
        model = Griffin(cfg, device="meta", dtype=torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) == count, name
        assert cfg.num_parameters() == count, name


# ----------------------------------------------------------------------------------
# rgemma format, meta loading, dtype
# ----------------------------------------------------------------------------------
def test_rgemma_round_trip_is_exact(official_pt, tmp_path):
    from safetensors import safe_open

    model = ck.load_model(official_pt, config=CFG)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"spm")
    out = ck.save_model(model, tmp_path / "rg", tokenizer_path=tok)
    assert sorted(os.listdir(out)) == ["model.safetensors", "rgemma_config.json", "tokenizer.model"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(model.state_dict())  # the tied embedding once
    loaded = ck.load_model(out)
    assert loaded.config == CFG
    assert loaded.source == {
        "format": "rgemma",
        "path": str(out),
        "tokenizer": str(out / "tokenizer.model"),
        "bundled": False,
    }
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    tokens = _tokens()
    assert torch.equal(_logits(loaded, tokens), _logits(model, tokens))

    ck.save_model(loaded, out)  # replacing an rgemma checkpoint is fine
    assert not (out / "tokenizer.model").exists()
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        ck.save_model(loaded, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_meta_loading_no_random_init_and_dtype(official_pt, hf_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("load_model must not initialise random weights")

    monkeypatch.setattr(Griffin, "reset_parameters", fail)
    for path in (official_pt, hf_dir):
        model = ck.load_model(path, dtype=torch.bfloat16, config=CFG)
        tensors = [*model.parameters(), *model.buffers()]
        assert not any(t.is_meta for t in tensors)
        assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
        assert torch.isfinite(_logits(model, _tokens(t=5))).all()
    # Default dtype: the checkpoint's own.
    bf16 = {k: v.to(torch.bfloat16) for k, v in torch.load(official_pt).items()}
    torch.save(bf16, tmp_path / "bf16.pt")
    model = ck.load_model(tmp_path / "bf16.pt", config=CFG)
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    assert ck.load_model(official_pt, dtype="float64").embedder.input_embedding.dtype == (
        torch.float64
    )


def test_loaded_weights_do_not_depend_on_the_file(official_pt, tmp_path):
    """`.pt` files are memory-mapped while loading; the parameters are copies, so writing
    over the checkpoint file afterwards does not touch the model."""
    path = tmp_path / "model.pt"
    shutil.copyfile(official_pt, path)
    model = ck.load_model(path, config=CFG)
    before = _logits(model, _tokens())
    torch.save({k: torch.zeros_like(v) for k, v in torch.load(path).items()}, path)
    assert torch.equal(_logits(model, _tokens()), before)


# ----------------------------------------------------------------------------------
# Bad inputs: each error names the key, file or shape
# ----------------------------------------------------------------------------------
def _bad_pt(tmp_path, official_pt, edit) -> str:
    sd = dict(torch.load(official_pt))
    edit(sd)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    return str(path)


def test_missing_key(official_pt, tmp_path):
    key = "blocks.2.attention_block.proj_v.weight"
    path = _bad_pt(tmp_path, official_pt, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match=f"missing.*{key}"):
        ck.load_model(path, config=CFG)


def test_unexpected_key(official_pt, tmp_path):
    key = "blocks.0.recurrent_block.extra"
    path = _bad_pt(tmp_path, official_pt, lambda sd: sd.update({key: torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=f"unexpected.*{key}"):
        ck.load_model(path, config=CFG)


def test_wrong_shape(official_pt, tmp_path):
    key = "blocks.1.mlp_block.ffw_down.weight"
    path = _bad_pt(tmp_path, official_pt, lambda sd: sd.update({key: torch.zeros(32, 47)}))
    with pytest.raises(CheckpointError, match=rf"{key}.*expected \(32, 48\), got \(32, 47\)"):
        ck.load_model(path, config=CFG)


def test_wrong_shape_hf(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    sd = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.temporal_block.conv_1d.weight"
    sd[key] = torch.zeros(40, 1, 3)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}.*expected \(40, 1, 4\), got \(40, 1, 3\)"):
        ck.load_model(tmp_path)


def test_truncated_files(official_pt, hf_dir, tmp_path):
    data = Path(official_pt).read_bytes()
    half = tmp_path / "half.pt"
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="half.pt"):
        ck.load_model(half)
    shutil.copytree(hf_dir, tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ck.load_model(tmp_path / "hf")


def test_text_file_renamed_pt(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("this is not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError, match="notes.pt"):
        ck.load_model(path)


def test_empty_directory_and_nonexistent_path(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found.*model.safetensors"):
        ck.load_model(tmp_path)
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere.*does not exist"):
        ck.load_model(missing)
    (tmp_path / "config.json").write_text(json.dumps(ck.griffin_to_hf_config(CFG)))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ck.load_model(tmp_path)


def test_no_bundled_model(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "bundled_model_path", lambda: tmp_path)
    with pytest.raises(CheckpointError, match="no bundled model.*--model"):
        ck.load_model()
