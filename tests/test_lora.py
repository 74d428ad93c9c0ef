"""LoRA (`rgemma.lora`): adapters on every projection, PEFT's on-disk format, merging.

Oracles: the model without adapters (untrained adapters change nothing), the same
model after `merge_lora` (merged == unmerged), and HF `RecurrentGemmaForCausalLM` on
the same weights with the adapter loaded by `peft.PeftModel.from_pretrained` (equal
logits within HF's attention window; see tests/test_checkpoint.py for HF's window).
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import pytest
import torch
from oracle import random_model

import rgemma
from rgemma import checkpoint as ck
from rgemma import lora
from rgemma.cli import main
from rgemma.config import GriffinConfig
from rgemma.errors import CheckpointError, ConfigError, InputError
from rgemma.model import BlockDiagonalLinear, Linear
from rgemma.tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer
from rgemma.training import TrainConfig

CFG = dataclasses.replace(GriffinConfig.preset("test-tiny"), vocab_size=4096)  # R, R, A
W = CFG.attention_window_size


def _model(seed: int = 0) -> rgemma.Griffin:
    return random_model(CFG, seed=seed, std=0.1)


def _tokens(t: int = W, b: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CFG.vocab_size, (b, t), generator=g)


@torch.no_grad()
def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens)[0]


def _trained(model, seed: int = 2, **kw):
    """`model` with LoRA on every projection and random (nonzero) adapters."""
    lora.apply_lora(model, 4, 8.0, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """(model with trained adapters, the adapter saved by rgemma)."""
    model = _trained(_model())
    path = lora.save_adapter(model, tmp_path_factory.mktemp("adapter") / "lora", "tiny-base")
    return model, path


def _hf_pair(model):
    """HF RecurrentGemmaForCausalLM with `model`'s base weights (adapters left out)."""
    warnings.filterwarnings("ignore")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.RecurrentGemmaConfig.from_dict(ck.griffin_to_hf_config(model.config))
    hf = transformers.RecurrentGemmaForCausalLM(cfg)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    missing, unexpected = hf.load_state_dict(ck.official_to_hf(base), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # the tied head
    hf.tie_weights()
    return hf.eval()


# ----------------------------------------------------------------------------------
# Wrapping, training, merging
# ----------------------------------------------------------------------------------
def test_untrained_adapters_change_nothing_and_keep_official_keys():
    model = _model()
    tokens = _tokens()
    before = _logits(model, tokens)
    official = {k: v.clone() for k, v in model.state_dict().items()}
    lora.apply_lora(model, 4, 8.0)
    assert torch.equal(_logits(model, tokens), before)
    wrapped = {n: type(m) for n, m in model.named_modules() if isinstance(m, lora.LoRALinear)}
    # Every projection: 3 recurrent + 3 MLP in blocks 0 and 1, 4 attention + 3 MLP in 2.
    assert len(wrapped) == 2 * 6 + 7
    assert "blocks.0.mlp_block.ffw_up.gate_proj" in wrapped
    assert "blocks.2.attention_block.proj_k" in wrapped
    sd = model.state_dict()
    adapters = {k for k in sd if ".lora_" in k}
    assert set(sd) - adapters == set(official)  # the official keys, unchanged
    assert all(torch.equal(sd[k], v) for k, v in official.items())
    assert len(adapters) == 2 * len(wrapped)
    assert adapters == set(lora.lora_state_dict(model))
    gate = model.blocks[0].mlp_block.ffw_up.gate_proj
    assert tuple(sd["blocks.0.mlp_block.ffw_up.gate_proj.lora_A.weight"].shape) == (4, CFG.width)
    assert gate.lora_B.weight.abs().sum() == 0 and gate.lora_A.weight.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapters


def test_an_optimizer_step_changes_only_the_adapters():
    model = _model().train()
    lora.apply_lora(model, 2, 4.0, targets=["q_proj", "linear_x", "up_proj"], dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2 * (1 + 2 + 3)  # proj_q once, linear_x twice, up_proj thrice
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    tokens = _tokens(t=12)
    logits, _ = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in before if ".lora_" in n}
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("gates", [False, True])
def test_merged_equals_unmerged(gates):
    model = _trained(_model(), gates=gates)
    if gates:
        assert isinstance(model.blocks[0].recurrent_block.rg_lru.a_gate, lora.LoRABlockDiagonal)
    tokens = _tokens(t=2 * W + 3)
    unmerged = _logits(model, tokens)
    assert (unmerged - _logits(_model(), tokens)).abs().max() > 0.1  # the adapters matter
    lora.merge_lora(model)
    assert not lora.has_lora(model)
    assert type(model.blocks[0].mlp_block.ffw_up.up_proj) is Linear
    assert type(model.blocks[1].recurrent_block.rg_lru.input_gate) is BlockDiagonalLinear
    assert set(model.state_dict()) == set(_model().state_dict())
    torch.testing.assert_close(_logits(model, tokens), unmerged, atol=2e-5, rtol=1e-5)


def test_lora_model_decodes_and_generates_like_the_merged_model():
    tok = Tokenizer(BUNDLED_TOKENIZER_PATH)
    model = _trained(_model(seed=3)).eval()
    tokens = _tokens(t=2 * W, b=1)
    full = _logits(model, tokens)
    with torch.no_grad():  # prefill then decode steps = one full forward
        _, state = model(tokens[:, :W])
        steps = []
        for i in range(W, 2 * W):
            logits, state = model.decode_step(tokens[:, i], state)
            steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, W:], atol=1e-5, rtol=1e-5)
    prompts = ["It is a truth", "Call me"]
    unmerged = rgemma.generate(model, tok, prompts, max_new_tokens=8, ignore_eos=True)
    lora.merge_lora(model)
    merged = rgemma.generate(model, tok, prompts, max_new_tokens=8, ignore_eos=True)
    assert [r.token_ids for r in unmerged] == [r.token_ids for r in merged]
    assert all(len(r.token_ids) == 8 for r in unmerged)


# ----------------------------------------------------------------------------------
# PEFT format
# ----------------------------------------------------------------------------------
def test_saved_adapter_is_peft_format_and_reloads_exactly(adapter_dir):
    model, path = adapter_dir
    config = json.loads((path / lora.ADAPTER_CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False
    assert config["base_model_name_or_path"] == "tiny-base"
    assert config["target_modules"] == sorted(
        ["linear_x", "linear_y", "linear_out", "q_proj", "k_proj", "v_proj", "o_proj"]
        + ["gate_proj", "up_proj", "down_proj"]
    )
    from safetensors.torch import load_file

    keys = set(load_file(path / lora.ADAPTER_WEIGHTS_NAME))
    assert "base_model.model.model.layers.0.temporal_block.linear_x.lora_A.weight" in keys
    assert "base_model.model.model.layers.2.temporal_block.o_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.1.mlp_block.gate_proj.lora_A.weight" in keys
    assert len(keys) == len(lora.lora_state_dict(model))
    size = lora.adapter_size(model)
    assert size.adapter_bytes == sum(
        p.numel() * p.element_size() for p in lora.lora_state_dict(model).values()
    )
    assert size.base_bytes + size.adapter_bytes == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )
    assert "% of the base's" in size.describe()

    fresh = lora.load_adapter(_model(), path)
    assert set(lora.lora_state_dict(fresh)) == set(lora.lora_state_dict(model))
    tokens = _tokens(t=2 * W)
    assert torch.equal(_logits(fresh, tokens), _logits(model, tokens))


def test_peft_loads_rgemma_adapter_and_rgemma_loads_peft_adapter(adapter_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, path = adapter_dir
    tokens = _tokens(t=W)  # within HF's window (one key shorter than the official)
    ours = _logits(model, tokens)
    hf = _hf_pair(model)
    peft_model = peft.PeftModel.from_pretrained(hf, str(path)).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens, use_cache=False).logits.float()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    # An adapter written by PEFT (its own file, from HF's module tree) loads back.
    peft_model.save_pretrained(tmp_path / "peft")
    back = lora.load_adapter(_model(), tmp_path / "peft")
    assert torch.equal(_logits(back, tokens), ours)
    # And one PEFT trained itself, on fewer modules, with rsLoRA scaling.
    cfg = peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["down_proj", "k_proj"], use_rslora=True
    )
    other = peft.get_peft_model(_hf_pair(_model()), cfg)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
        expect = other(input_ids=tokens, use_cache=False).logits.float()
    other.save_pretrained(tmp_path / "peft_rs")
    mine = lora.load_adapter(_model(), tmp_path / "peft_rs")
    assert len(lora.lora_state_dict(mine)) == 2 * (3 + 1)
    torch.testing.assert_close(_logits(mine, tokens), expect, atol=1e-4, rtol=0)


def test_load_model_with_adapter_and_convert_merge_adapter(adapter_dir, tmp_path, capsys):
    model, path = adapter_dir
    base_dir = ck.save_model(_model(), tmp_path / "base", tokenizer_path=BUNDLED_TOKENIZER_PATH)
    tokens = _tokens(t=2 * W)
    expect = _logits(model, tokens)
    merged = ck.load_model(base_dir, adapter=path)
    assert not lora.has_lora(merged) and not any(p.requires_grad for p in merged.parameters())
    assert merged.source["adapter"] == {
        "path": str(path),
        "merged": True,
        "bytes": lora.adapter_size(model).adapter_bytes,
    }
    torch.testing.assert_close(_logits(merged, tokens), expect, atol=2e-5, rtol=1e-5)
    unmerged = ck.load_model(base_dir, adapter=path, merge_adapter=False)
    assert lora.has_lora(unmerged) and torch.equal(_logits(unmerged, tokens), expect)
    with pytest.raises(CheckpointError, match="unmerged LoRA adapters"):
        ck.save_model(unmerged, tmp_path / "nope")

    for fmt in ("rgemma", "hf"):
        out = tmp_path / f"merged-{fmt}"
        argv = ["convert", str(base_dir), str(out), "--merge-adapter", str(path), "--to", fmt]
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert f"merged {path}: adapter " in printed and "% of the base's" in printed
        torch.testing.assert_close(
            _logits(ck.load_model(out), tokens), expect, atol=2e-5, rtol=1e-5
        )
    # The inference commands take --adapter DIR.
    argv = ["generate", "Call me", "--model", str(base_dir), "--adapter", str(path)]
    assert main([*argv, "--max-new-tokens", "3", "--temperature", "0"]) == 0


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------
def test_bad_targets_and_hyperparameters_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"unknown LoRA target 'qproj'; valid: linear_x, "):
        lora.apply_lora(_model(), 4, 8.0, targets=["qproj"])
    for rank in (0, -1, 2.5):
        with pytest.raises(ConfigError, match=rf"rank must be an int >= 1, got {rank}"):
            lora.apply_lora(_model(), rank, 8.0)
    with pytest.raises(ConfigError, match="alpha must be a positive number, got 0"):
        lora.apply_lora(_model(), 4, 0)
    with pytest.raises(ConfigError, match="dropout must be a number in"):
        lora.apply_lora(_model(), 4, 8.0, dropout=1.0)
    hawk = random_model(dataclasses.replace(CFG, block_types=("recurrent",) * 2))
    with pytest.raises(ConfigError, match="proj_q name no module of this model"):
        lora.apply_lora(hawk, 4, 8.0, targets=["proj_q", "linear_x"])
    lora.apply_lora(hawk, 4, 8.0)  # the default targets: those the model has
    with pytest.raises(InputError, match="already has LoRA adapters"):
        lora.apply_lora(hawk, 4, 8.0)
    with pytest.raises(InputError, match="no LoRA adapters to merge"):
        lora.merge_lora(_model())
    with pytest.raises(InputError, match="has no PEFT/HF equivalent"):
        lora.save_adapter(_trained(_model(), targets=["a_gate"]), "unused")
    with pytest.raises(InputError, match="unmerged LoRA adapters"):
        rgemma.quantize(_trained(_model()))
    # TrainConfig checks its LoRA fields the same way.
    cfg = TrainConfig(model="test-tiny", lora_rank=8, lora_targets=["q_proj", "a_gate"])
    assert cfg.lora_targets == ["q_proj", "a_gate"]
    with pytest.raises(ConfigError, match="TrainConfig.lora_targets: unknown LoRA target 'x'"):
        TrainConfig(model="test-tiny", lora_targets=["x"])
    with pytest.raises(ConfigError, match="TrainConfig.lora_rank must be an int >= 0"):
        TrainConfig(model="test-tiny", lora_rank=-1)
    with pytest.raises(ConfigError, match="TrainConfig.lora_alpha must be positive"):
        TrainConfig(model="test-tiny", lora_alpha=0)


def test_adapter_for_another_model_is_refused(adapter_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = adapter_dir
    with pytest.raises(CheckpointError, match=r"trained on another base model \(base fingerprint"):
        lora.load_adapter(_model(seed=5), path)  # same shape, other weights
    lora.load_adapter(_model(seed=5), path, check_base=False)
    wide = random_model(dataclasses.replace(CFG, width=64, num_heads=4))
    with pytest.raises(CheckpointError, match=r"another model shape .*width \(32 vs 64\)"):
        lora.load_adapter(wide, path)

    # PEFT's own files carry no rgemma metadata: names and shapes are checked key by key.
    plain = tmp_path / "plain"
    plain.mkdir()
    config = json.loads((path / lora.ADAPTER_CONFIG_NAME).read_text())
    tensors = load_file(path / lora.ADAPTER_WEIGHTS_NAME)
    a_key = "base_model.model.model.layers.0.temporal_block.linear_x.lora_A.weight"
    b_key = a_key.replace("lora_A", "lora_B")

    def write(tensors, **options):
        save_file(tensors, plain / lora.ADAPTER_WEIGHTS_NAME)
        (plain / lora.ADAPTER_CONFIG_NAME).write_text(json.dumps({**config, **options}))

    write({a_key: tensors[a_key], b_key: tensors[b_key]})
    assert len(lora.lora_state_dict(lora.load_adapter(_model(seed=5), plain))) == 2
    with pytest.raises(
        CheckpointError,
        match=rf"plain/adapter_model.safetensors: key '{a_key}' has shape \(4, 32\), this "
        r"model needs \(4, 64\) \(r=4, blocks.0.recurrent_block.linear_x is 64 -> 40\)",
    ):
        lora.load_adapter(wide, plain)
    write({**tensors, a_key.replace("layers.0", "layers.7"): tensors[a_key].clone()})
    with pytest.raises(CheckpointError, match="is for layer 7; this model has 3"):
        lora.load_adapter(_model(), plain)
    write({a_key.replace("linear_x", "q_proj"): tensors[a_key]})
    with pytest.raises(CheckpointError, match=r"names proj_q, which layer 0 \(recurrent\)"):
        lora.load_adapter(_model(), plain)
    write({a_key.replace("linear_x", "conv_1d"): tensors[a_key]})
    with pytest.raises(CheckpointError, match="conv_1d.lora_A.weight' is not a LoRA weight of"):
        lora.load_adapter(_model(), plain)
    write({a_key: tensors[a_key]})
    with pytest.raises(CheckpointError, match="linear_x has lora_A but no lora_B"):
        lora.load_adapter(_model(), plain)
    write(tensors, use_dora=True)
    with pytest.raises(CheckpointError, match=r"use_dora = True is not supported"):
        lora.load_adapter(_model(), plain)
    with pytest.raises(CheckpointError, match="is not a directory"):
        lora.load_adapter(_model(), tmp_path / "missing")
