"""Weight-only int8: what is quantized, what stays float32, and how close it stays."""

import copy

import pytest
import torch
from oracle import random_model

from rgemma import GriffinConfig, InputError, quantize
from rgemma.ops import int8_matmul
from rgemma.quantization import Int8Linear, quantize_per_channel

CFG = GriffinConfig.preset("test-small")


def test_per_channel_round_trip_error_is_within_half_a_step():
    w = torch.randn(64, 48)
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize(
    "rows, k",
    # int8 kernel path, dequantized path, and widths that are not a multiple of 16
    # (the kernel reads out of bounds for those: they must take the dense path).
    [(1, 64), (3, 64), (40, 64), (1, 24), (8, 40), (7, 72)],
)
def test_int8_matmul_matches_dequantized_weight(rows, k):
    w = torch.randn(96, k)
    q, scale = quantize_per_channel(w)
    x = torch.randn(rows, k)
    ref = x @ (q.float() * scale[:, None]).T
    # The kernel path computes in bfloat16: compare at bfloat16 resolution.
    torch.testing.assert_close(int8_matmul(x, q, scale), ref, rtol=2e-2, atol=5e-2)


def test_quantized_model_keeps_recurrence_in_float32_and_stays_close():
    model = random_model(CFG, std=0.05)
    qmodel = quantize(copy.deepcopy(model).to(torch.bfloat16), "int8")
    block = qmodel.blocks[0]
    assert isinstance(block.recurrent_block.linear_x, Int8Linear)
    assert block.recurrent_block.rg_lru.a_param.dtype == torch.float32
    assert block.recurrent_block.conv_1d.w.dtype == torch.float32
    assert block.temporal_pre_norm.scale.dtype == torch.float32
    tokens = torch.randint(0, CFG.vocab_size, (2, 30))
    with torch.no_grad():
        ref, ref_state = model(tokens)
        out, state = qmodel(tokens)
        assert state.blocks[0].rg_lru.dtype == torch.float32
        step_ref, _ = model(tokens[:, :1], state=ref_state)
        step, _ = qmodel(tokens[:, :1], state=state)
    scale = ref.abs().max()
    assert (out - ref).abs().max() < 0.02 * scale
    assert (step - step_ref).abs().max() < 0.02 * scale
    # Quantized decode (bfloat16 int8 kernel) agrees with its own prefill (dequantized
    # float32 matmul) to bfloat16 resolution.
    with torch.no_grad():
        full, _ = qmodel(tokens)
        _, s = qmodel(tokens[:, :29])
        last, _ = qmodel(tokens[:, 29:], state=s)
    torch.testing.assert_close(last[:, 0], full[:, 29], rtol=0, atol=5e-2)


def test_unknown_mode():
    with pytest.raises(InputError, match="unknown quantization mode 'int4'"):
        quantize(random_model(CFG), "int4")


def test_quantize_twice_or_save_quantized_is_refused(tmp_path):
    from rgemma import CheckpointError, save_model

    qmodel = quantize(random_model(CFG), "int8")
    with pytest.raises(InputError, match=r"already quantized \(int8\)"):
        quantize(qmodel, "int8")
    with pytest.raises(CheckpointError, match="cannot save an int8-quantized model"):
        save_model(qmodel, tmp_path / "q")
    with pytest.raises(InputError, match="expects a rgemma Griffin model, got Linear"):
        quantize(torch.nn.Linear(2, 2))


def test_quantized_model_compiles_and_decodes_like_eager():
    """int8 kernel path (widths multiple of 16) under torch.compile: same logits as
    the eager quantized step, and it really compiled where a C++ compiler exists."""
    import shutil

    from rgemma.generation import compile_decode

    cfg = GriffinConfig.preset("test-small")
    eager = quantize(random_model(cfg, std=0.05), "int8")
    compiled = compile_decode(copy.deepcopy(eager))
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        _, state = eager(tokens)
        for tok in (5, 9, 300):
            t = torch.tensor([tok])
            want, state_e = eager.decode_step(t, state)
            got, _ = compiled.decode_step(t, state)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
            state = state_e
    if shutil.which("c++") or shutil.which("g++"):
        assert compiled.decode_step.failed is None and compiled.decode_step.calls == 3
