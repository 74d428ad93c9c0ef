"""`ops.linear_epilogue`: the oneDNN post-op path equals the reference (linear, then
GELU / product / residual add) for bfloat16 prefill-sized inputs; everywhere else it
*is* the reference (few rows, float32, autograd, gradients); bad arguments are
one-line errors; the model's bfloat16 prefill matches with and without it."""

import pytest
import torch
from oracle import random_model

from rgemma import GriffinConfig, InputError, ops
from rgemma.ops.epilogue import (
    EPILOGUES,
    MIN_ROWS,
    linear_epilogue_onednn,
    linear_epilogue_ref,
)

BF16 = torch.bfloat16


def inputs(rows: int, dtype, epilogue: str, bias: bool = True, seed: int = 0):
    """x (1, rows, 96), weight (80, 96), bias (80,) or None, other (1, rows, 80) or None."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, rows, 96, generator=g) / 96**0.5
    w = torch.randn(80, 96, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    other = None if epilogue == "gelu_tanh" else torch.randn(1, rows, 80, generator=g)
    cast = [None if v is None else v.to(dtype) for v in (x, w, b, other)]
    return cast[:3] + [epilogue, cast[3]]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("rows", [MIN_ROWS + 1, 257])
def test_onednn_equals_reference_bfloat16(rows, epilogue, bias):
    x, w, b, ep, other = inputs(rows, BF16, epilogue, bias)
    kept = None if other is None else other.clone()
    out = linear_epilogue_onednn(x, w, b, ep, other)
    ref = linear_epilogue_ref(x, w, b, ep, other)
    # The float32 truth: the reference rounds the linear to bfloat16 once more.
    y = x.float() @ w.float().T + (0 if b is None else b.float())
    truth = {
        "gelu_tanh": lambda: torch.nn.functional.gelu(y, approximate="tanh"),
        "mul": lambda: y * other.float(),
        "add": lambda: other.float() + y,
    }[epilogue]()
    assert out.dtype == BF16 and out.shape == ref.shape == (1, rows, 80)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    # No less accurate than the reference against float32 (one rounding fewer).
    assert (out.float() - truth).abs().mean() <= (ref.float() - truth).abs().mean() * 1.05
    if kept is not None:
        assert torch.equal(other, kept)  # the gate / residual is read, never written


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_falls_back_to_reference_exactly(epilogue):
    """Few rows (decode), float32 and a non-contiguous weight run the reference."""
    for rows, dtype in ((MIN_ROWS, BF16), (1, BF16), (200, torch.float32)):
        args = inputs(rows, dtype, epilogue)
        assert torch.equal(linear_epilogue_onednn(*args), linear_epilogue_ref(*args))
    x, w, b, ep, other = inputs(200, BF16, epilogue)
    w_t = w.T.contiguous().T  # same values, column-major
    assert torch.equal(
        linear_epilogue_onednn(x, w_t, b, ep, other), linear_epilogue_ref(x, w, b, ep, other)
    )


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_gradients_are_the_references(epilogue):
    """Under autograd the fast path is the reference: same output and gradients."""
    results = []
    for fn in (linear_epilogue_ref, linear_epilogue_onednn):
        args = [
            a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) else a
            for a in inputs(200, BF16, epilogue, seed=3)
        ]
        out = fn(*args)
        g = torch.Generator().manual_seed(9)
        loss = (out.float() * torch.randn(out.shape, generator=g)).sum()
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        results.append((out, torch.autograd.grad(loss, tensors)))
    (ref, ref_grads), (out, grads) = results
    assert torch.equal(out, ref)
    for grad, ref_grad in zip(grads, ref_grads):
        assert ref_grad.abs().sum() > 0 and torch.equal(grad, ref_grad)


def test_bad_arguments_are_one_line_errors():
    x, w, b, _, other = inputs(8, torch.float32, "mul")
    with pytest.raises(InputError, match="unknown linear epilogue 'relu'"):
        ops.linear_epilogue(x, w, b, "relu", other)
    with pytest.raises(InputError, match="'mul' takes an other tensor"):
        ops.linear_epilogue(x, w, b, "mul")
    with pytest.raises(InputError, match="'gelu_tanh' takes no other tensor"):
        ops.linear_epilogue(x, w, b, "gelu_tanh", other)


def test_dispatcher_chooses_onednn_on_cpu():
    assert ops.resolve("linear_epilogue", "cpu") == "onednn"
    assert ops.resolve("linear_epilogue", "cuda") == "ref"
    with ops.use(linear_epilogue="ref"):
        assert ops.describe("cpu")["linear_epilogue"] == "ref"


def test_model_bfloat16_prefill_matches_unfused():
    """A bfloat16 prefill of 100 tokens (the fused MLP, recurrent gate and residual
    adds) is as close to the float32 model as the unfused bfloat16 one: logits and
    every float state."""
    cfg = GriffinConfig.preset("test-small")
    model = random_model(cfg, seed=0).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        truth, truth_state = model(tokens)
        model.to(BF16)
        fused, state = model(tokens)
        with ops.use(linear_epilogue="ref"):
            ref, ref_state = model(tokens)
    assert not torch.equal(fused, ref)  # the fused path ran

    def error(a, b):
        return (a.float() - b.float()).abs().mean() / b.float().abs().mean()

    assert error(fused, truth) <= 1.25 * error(ref, truth) + 1e-3
    for blocks in zip(state.blocks, ref_state.blocks, truth_state.blocks):
        for u, v, w in zip(*blocks):
            if w.is_floating_point():
                assert error(u, w) <= 1.25 * error(v, w) + 1e-3
