"""Weight-only int8 and int4: what is quantized, what stays float32, how close it
stays, and the int4 kernel against its reference."""

import copy

import pytest
import torch
from oracle import random_model

from rgemma import GriffinConfig, InputError, ops, quantize
from rgemma.ops import int8_matmul
from rgemma.ops.quant import (
    can_use_kernel,
    int4_codes,
    int4_dequantize,
    int4_matmul_ref,
    pack_int4,
    to_cpu_packed,
    unpack_int4,
)
from rgemma.quantization import (
    INT4_DEFAULT_GROUP_SIZE,
    Int4Linear,
    Int8Linear,
    quantize_int4_groupwise,
    quantize_per_channel,
)

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
    with pytest.raises(
        InputError, match="unknown quantization mode 'int3'; supported: 'int8', 'int4'"
    ):
        quantize(random_model(CFG), "int3")


def test_quantize_twice_is_refused():
    # (saving a quantized model is supported since issue 13: tests/test_convert.py)
    qmodel = quantize(random_model(CFG), "int8")
    with pytest.raises(InputError, match=r"already quantized \(int8\)"):
        quantize(qmodel, "int8")
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


# ----------------------------------------------------------------------------------
# int4
# ----------------------------------------------------------------------------------
KERNEL = can_use_kernel(128, 64, 32)
needs_kernel = pytest.mark.skipif(not KERNEL, reason="no CPU int4 kernel in this torch")


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_groupwise_round_trip_error_is_within_half_a_step(group_size):
    w = torch.randn(64, 256) * torch.rand(64, 1)  # rows of different scales
    codes, scale_zero = quantize_int4_groupwise(w, group_size)
    assert codes.shape == (64, 128) and codes.dtype == torch.uint8
    assert scale_zero.shape == (256 // group_size, 64, 2) and scale_zero.dtype == torch.bfloat16
    step = scale_zero[..., 0].float().T.repeat_interleave(group_size, dim=1)  # (n, k)
    err = (int4_dequantize(codes, scale_zero, group_size, packed=False) - w).abs()
    # half a step, plus the bfloat16 rounding of the zero (up to 2^-8 of its size)
    zero = scale_zero[..., 1].float().T.abs().repeat_interleave(group_size, dim=1)
    assert (err <= step / 2 + zero / 256 + 1e-6).all()
    assert torch.equal(unpack_int4(pack_int4(unpack_int4(codes))), unpack_int4(codes))


@needs_kernel
def test_cpu_packed_layout_reads_back_every_row_and_any_gathered_rows():
    codes = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(1))
    packed = to_cpu_packed(pack_int4(codes))
    assert torch.equal(int4_codes(packed, 96, packed=True).long(), codes)
    assert torch.equal(int4_codes(packed, 96, True, slice(64, 192)).long(), codes[64:])
    rows = torch.tensor([[0, 31, 32, 63], [64, 100, 191, 5]])
    assert torch.equal(int4_codes(packed, 96, True, rows).long(), codes[rows])


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_int4_kernel_equals_reference(rows, dtype):
    """The kernel (up to 16 rows) and the reference on the kernel's packed codes,
    against the reference on plain codes, the specification."""
    g = torch.Generator().manual_seed(rows)
    codes, sz = quantize_int4_groupwise(torch.randn(128, 256, generator=g), 64)
    packed = to_cpu_packed(codes)
    x = torch.randn(2, rows, 256, generator=g).to(dtype)
    want = int4_matmul_ref(x.float(), codes, sz, 64)  # (2, rows, 128) float32
    got_ref = ops.int4_matmul(x, packed, sz, 64, True, impl="ref")
    got = ops.int4_matmul(x, packed, sz, 64, True, impl="kernel")
    assert got.dtype == dtype and got.shape == (2, rows, 128)
    # the reference rounds to x's dtype at the end: bfloat16 is 2^-8 relative
    rtol = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got_ref.float(), want, rtol=rtol, atol=1e-4)
    # The kernel computes in bfloat16 (float32 accumulation): bfloat16 resolution.
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=0.1)


def test_int4_model_keeps_recurrence_in_float32_and_stays_close():
    model = random_model(CFG, std=0.05)
    qmodel = quantize(copy.deepcopy(model).to(torch.bfloat16), "int4")
    block = qmodel.blocks[0]
    assert isinstance(block.recurrent_block.linear_x, Int4Linear)
    assert block.recurrent_block.linear_x.group_size == INT4_DEFAULT_GROUP_SIZE
    assert qmodel.blocks[0].mlp_block.ffw_down.group_size == 32  # MLP width 96: 32 divides it
    assert block.recurrent_block.rg_lru.a_param.dtype == torch.float32
    assert block.recurrent_block.conv_1d.w.dtype == torch.float32
    tokens = torch.randint(0, CFG.vocab_size, (2, 30))
    with torch.no_grad():
        ref, _ = model(tokens)
        out, state = qmodel(tokens)
        assert state.blocks[0].rg_lru.dtype == torch.float32
        # decode (kernel, one row each) == prefill (dequantized), to bfloat16 resolution
        _, s = qmodel(tokens[:, :29])
        last, _ = qmodel(tokens[:, 29:], state=s)
        # a batch == its rows alone
        row1, _ = qmodel(tokens[1:])
    # 4-bit weights on random (N(0, 0.05)) weights: about 7% of the largest logit
    # (measured 6.7%); benchmarks/quant_quality.py measures the real cost.
    assert (out - ref).abs().max() < 0.12 * ref.abs().max()
    assert (out - ref).abs().mean() < 0.02 * ref.abs().max()
    torch.testing.assert_close(last[:, 0], out[:, 29], rtol=0, atol=5e-2)
    torch.testing.assert_close(row1, out[1:], rtol=0, atol=1e-5)


def test_int4_model_under_the_reference_ops_gives_the_same_logits():
    qmodel = quantize(random_model(CFG, std=0.05), "int4")
    tokens = torch.randint(0, CFG.vocab_size, (1, 9))
    with torch.no_grad():
        _, state = qmodel(tokens[:, :8])
        fast, _ = qmodel.decode_step(tokens[:, 8], state)
        with ops.use(int4_matmul="ref"):
            ref, _ = qmodel.decode_step(tokens[:, 8], state)
    torch.testing.assert_close(fast, ref, rtol=0, atol=5e-2)


def test_int4_model_quantized_under_the_reference_takes_prompts_of_several_tokens():
    """Quantized with `int4_matmul="ref"` the codes stay "plain"; the embedder then
    gathers (b, t) rows of codes (a prompt), which must unpack per token."""
    model = random_model(CFG, std=0.05)
    tokens = torch.randint(0, CFG.vocab_size, (2, 5))
    with ops.use(int4_matmul="ref"):
        qmodel = quantize(copy.deepcopy(model), "int4")  # quantize works in place
        with torch.no_grad():
            ref, _ = qmodel(tokens)
    assert not any(getattr(m, "packed", False) for m in qmodel.modules())
    with torch.no_grad():
        fast, _ = quantize(model, "int4")(tokens)
    torch.testing.assert_close(ref, fast, rtol=0, atol=5e-2)


def test_int4_bad_group_size_width_or_save_is_an_error(tmp_path):
    from rgemma import CheckpointError, save_model

    with pytest.raises(InputError, match="group_size 48 is for int4 only, one of 32, 64, 128, 256"):
        quantize(random_model(CFG), "int4", group_size=48)
    with pytest.raises(InputError, match="group_size 32 is for int4 only"):
        quantize(random_model(CFG), "int8", group_size=32)
    odd = GriffinConfig(**{**CFG.to_dict(), "width": 80, "lru_width": 80, "num_heads": 4})
    with pytest.raises(InputError, match="multiples of 32; the embedding has 80"):
        quantize(random_model(odd), "int4")
    with pytest.raises(CheckpointError, match="cannot save an int4-quantized model"):
        save_model(quantize(random_model(CFG), "int4"), tmp_path / "q")
