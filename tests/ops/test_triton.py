"""The Triton kernels (`rgemma.ops.triton`) equal their references: outputs, final
state and every gradient, with document resets, left padding, odd lengths, more than
one tile of time and of channels, a given initial state, float32 and bfloat16 inputs;
and the model with them equals the model with the references (logits, state,
gradients).

On CUDA they run as compiled kernels (`benchmarks/gpu_check.py` runs this file
there); without a GPU, Triton's interpreter runs them on CPU tensors
(TRITON_INTERPRET=1, set here before Triton is first imported), one small tile
configuration, about 10 s on 2 cores. Skipped where the `triton` package is not
installed (it is in the test extra).
"""

import importlib
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
pytest.importorskip(
    "triton", reason="the triton package is not installed (pip install triton; test extra)"
)

from oracle import random_model

from rgemma import GriffinConfig, InputError, ops
from rgemma.ops.conv1d import conv1d_ref
from rgemma.ops.scan import linear_scan_ref

_loaded = sys.modules.get("rgemma.ops.triton")
if _loaded is not None and not CUDA and not _loaded.INTERPRET:
    # Imported before TRITON_INTERPRET was set (by another test module): rebuild the
    # kernels as interpreted ones, and let the dispatcher take them again.
    importlib.reload(_loaded)
    ops._triton = None
from rgemma.ops import triton as kernels

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# 1: the decode step (torch path); 7: one tile; 33: five tiles with a ragged end.
LENGTHS = [1, 7, 33]


def positions(t: int) -> torch.Tensor:
    """(3, t) segment_pos: row 0 continues a document from the state (position 40 on)
    and starts a new one mid-row; row 1 is left-padded (-1) then starts a document;
    row 2 continues from position 3."""
    pos = torch.stack([torch.arange(t) + 40, torch.arange(t) - t // 3, torch.arange(t) + 3])
    pos[1] = pos[1].clamp(min=-1)
    if t > 2:
        pos[0, t // 2 :] = torch.arange(t - t // 2)
    return pos


def scan_inputs(t, dtype, seed, e=40):
    """a, x (3, t, e) with resets (a = 0) where `positions` starts a document, h0 (3, e)
    float32; e = 40 is more than one channel tile under the interpreter."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(3, t, e, generator=g) * 0.5 + 0.5  # decays in [0.5, 1)
    a = a.masked_fill((positions(t) == 0)[..., None], 0.0)
    x, h0 = torch.randn(3, t, e, generator=g), torch.randn(3, e, generator=g)
    return [a.to(dtype).to(DEVICE), x.to(dtype).to(DEVICE), h0.to(DEVICE)]


def conv1d_inputs(t, dtype, seed, e=40):
    """x (3, t, e), `positions`, a given conv state (3, 3, e), w (4, e), b (e,)."""
    g = torch.Generator().manual_seed(seed)
    x, state = torch.randn(3, t, e, generator=g), torch.randn(3, 3, e, generator=g)
    w, b = torch.randn(4, e, generator=g), torch.randn(e, generator=g)
    return [x.to(dtype).to(DEVICE), positions(t).to(DEVICE)] + [
        v.to(dtype).to(DEVICE) for v in (state, w, b)
    ]


def run(fn, inputs, grad_args):
    """fn on cloned inputs -> (outputs tuple, gradients of a fixed random projection)."""
    args = [
        v.detach().clone().requires_grad_(i in grad_args) if isinstance(v, torch.Tensor) else v
        for i, v in enumerate(inputs)
    ]
    outs = fn(*args)
    g = torch.Generator().manual_seed(123)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, [args[i] for i in grad_args])


def _compare(ref_fn, fn, inputs, grad_args, dtype, assert_close, what):
    ref_outs, ref_grads = run(ref_fn, inputs, grad_args)
    outs, grads = run(fn, inputs, grad_args)
    assert len(outs) == len(ref_outs)
    for name, out, ref in zip(("output", "final state"), outs, ref_outs):
        assert out.dtype == ref.dtype and out.device == ref.device, (what, name)
        assert torch.isfinite(out).all(), (what, name)
        assert_close(out, ref, dtype, "out", f"{what} {name}")
    for i, grad, ref in zip(grad_args, grads, ref_grads):
        assert grad.dtype == ref.dtype and ref.abs().sum() > 0, (what, i)
        assert_close(grad, ref, dtype, "grad", f"{what} gradient of input {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("t", LENGTHS)
def test_scan_kernel_equals_reference(t, dtype, assert_close):
    """Forward and reverse-scan backward, a given float32 initial state, a reset
    (a = 0) mid-row in row 0."""
    inputs = scan_inputs(t, dtype, seed=t)
    _compare(
        linear_scan_ref, kernels.linear_scan_triton, inputs, (0, 1, 2), dtype, assert_close, "scan"
    )


def test_scan_kernel_without_initial_state(assert_close):
    a, x, _ = scan_inputs(33, torch.float32, seed=5)
    _compare(
        lambda a, x: linear_scan_ref(a, x),
        lambda a, x: kernels.linear_scan_triton(a, x),
        [a, x],
        (0, 1),
        torch.float32,
        assert_close,
        "scan without h0",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("t", [1, 2, 7, 33])
def test_conv1d_kernel_equals_reference(t, dtype, assert_close):
    """Rows continuing a document (taps from the state), starting one mid-row, and
    left-padded; t = 2 < k takes part of the new state from the old one."""
    inputs = conv1d_inputs(t, dtype, seed=t)
    _compare(conv1d_ref, kernels.conv1d_triton, inputs, (0, 2, 3, 4), dtype, assert_close, "conv")


def test_dispatcher_runs_the_kernels_by_name():
    a, x, h0 = scan_inputs(9, torch.float32, seed=0)
    y, h = ops.linear_scan(a, x, h0, impl="triton")
    y_ref, h_ref = linear_scan_ref(a, x, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert ops.describe("cuda")["scan"] == ops.describe("cuda")["conv1d"] == "triton"
    assert ops.describe("cpu")["scan"] != "triton"  # only CUDA picks them by itself


def test_kernels_refuse_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)
    a, x, h0 = (v.cpu() for v in scan_inputs(5, torch.float32, seed=0))
    with pytest.raises(InputError, match=r"^linear_scan_triton: the triton kernels need CUDA"):
        kernels.linear_scan_triton(a, x, h0)
    with pytest.raises(InputError, match=r"^conv1d_triton: the triton kernels need CUDA"):
        kernels.conv1d_triton(*(v.cpu() for v in conv1d_inputs(5, torch.float32, seed=0)))


def test_forcing_triton_where_it_does_not_import_names_the_package(monkeypatch):
    monkeypatch.setattr(ops, "_triton", {})
    monkeypatch.setattr(ops, "_triton_missing", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(InputError) as err:
        ops.use(scan="triton")
    msg = str(err.value)
    assert msg.startswith("scan impl 'triton' needs the triton package (pip install triton)")
    assert "No module named 'triton'" in msg and "\n" not in msg


def test_model_with_kernels_equals_model_with_references():
    """test-tiny (recurrent, recurrent, attention) on packed documents and left
    padding, continuing from a state: logits, state and parameter gradients."""
    torch.manual_seed(0)
    model = random_model(GriffinConfig.preset("test-tiny"), seed=3, std=0.1).to(DEVICE)
    model.requires_grad_(True)
    tokens = torch.randint(0, model.config.vocab_size, (3, 9), generator=torch.Generator())
    pos = positions(9)
    tokens, pos = tokens.to(DEVICE), pos.to(DEVICE)

    def forward():
        model.zero_grad()
        _, state = model(tokens[:, :3], pos[:, :3])  # a state to continue from
        logits, state = model(tokens[:, 3:], pos[:, 3:], state)
        logits.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return logits.detach(), state, grads

    with ops.use("ref"):
        ref_logits, ref_state, ref_grads = forward()
    with ops.use(scan="triton", conv1d="triton"):
        logits, state, grads = forward()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(state.blocks, ref_state.blocks):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    for name, want in ref_grads.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-5, msg=name)
