"""Every implementation in `rgemma.ops` equals its reference (outputs, final state,
gradients) with document resets, left padding, odd lengths, a given initial state,
float32 and bfloat16 inputs; and the dispatcher: forcing the references gives the
model's logits, bad names are one-line errors."""

import os
import subprocess
import sys
import types

import pytest
import torch
from oracle import random_model
from torch import Tensor

from rgemma import GriffinConfig, InputError, ops, quantize
from rgemma.ops import IMPLEMENTATIONS
from rgemma.quantization import quantize_per_channel

LENGTHS = [1, 7, 33, 129]
DTYPES = [torch.float32, torch.bfloat16]


def positions(t: int) -> Tensor:
    """(3, t) segment_pos: row 0 continues a document from the state (position 40 on)
    and starts a new one mid-row; row 1 is left-padded (-1) then starts a document;
    row 2 continues from position 3."""
    pos = torch.stack([torch.arange(t) + 40, torch.arange(t) - t // 3, torch.arange(t) + 3])
    pos[1] = pos[1].clamp(min=-1)
    if t > 2:
        pos[0, t // 2 :] = torch.arange(t - t // 2)
    return pos


def scan_inputs(t, dtype, g):
    a = torch.rand(2, t, 6, generator=g) * 0.5 + 0.5  # decays in [0.5, 1)
    if t > 2:
        a[0, t // 2] = 0.0  # a document starts mid-row: the state resets
    x = torch.randn(2, t, 6, generator=g)
    h0 = torch.randn(2, 6, generator=g)  # given initial state, float32 as in the model
    return [a.to(dtype), x.to(dtype), h0]


def conv1d_inputs(t, dtype, g):
    x = torch.randn(3, t, 8, generator=g)
    conv_state = torch.randn(3, 3, 8, generator=g)  # given state: the last 3 inputs
    w, b = torch.randn(4, 8, generator=g), torch.randn(8, generator=g)
    return [x.to(dtype), positions(t), conv_state.to(dtype), w.to(dtype), b.to(dtype)]


def attention_inputs(t, dtype, g):
    h, hd, window = 2, 8, 5
    pos = positions(t)
    # Cache: row 0 full (positions 35..39), row 1 empty, row 2 holding positions 0..2.
    cache_pos = torch.tensor([[35, 36, 37, 38, 39], [-1] * 5, [-1, -1, 0, 1, 2]])
    doc = torch.cumsum((pos == 0).long(), dim=1)  # 0 continues the cache's document
    k_pos, k_doc = torch.cat([cache_pos, pos], 1), torch.cat([torch.zeros_like(cache_pos), doc], 1)
    q = torch.randn(3, t, h, hd, generator=g) * hd**-0.5
    k, v = torch.randn(2, 3, window + t, hd, generator=g)
    return [q.to(dtype), k.to(dtype), v.to(dtype), pos, k_pos, doc, k_doc, window, window]


def linear_inputs(t, dtype, g):
    x = torch.randn(1, t, 32, generator=g) / 32**0.5  # t == 1: one row (the GEMV path)
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    return [x.to(dtype), w.to(dtype), b.to(dtype)]


def int8_matmul_inputs(t, dtype, g):
    x = torch.randn(1, t, 64, generator=g) / 8  # up to 16 rows: the int8 kernel on CPU
    q, scale = quantize_per_channel(torch.randn(96, 64, generator=g))
    return [x.to(dtype), q, scale, scale.to(torch.bfloat16)]


def int4_matmul_inputs(t, dtype, g):
    from rgemma.ops.quant import can_use_kernel, to_cpu_packed
    from rgemma.quantization import quantize_int4_groupwise

    x = torch.randn(1, t, 64, generator=g) / 8  # up to 16 rows: the int4 kernel on CPU
    codes, scale_zero = quantize_int4_groupwise(torch.randn(128, 64, generator=g), 32)
    packed = can_use_kernel(128, 64, 32)  # the kernel's layout where it exists
    return [x.to(dtype), to_cpu_packed(codes) if packed else codes, scale_zero, 32, packed]


def decode_attention_inputs(t, dtype, g):
    """One new token per row against a ring window of 5 slots (key of position p in
    slot p % 5): row 0 full (positions 35 + t .. 39 + t), row 1 empty, row 2 holding
    0..2 and, for odd t, starting a new document (it then sees only itself)."""
    h, hd, w = 2, 8, 5
    p0 = 40 + t
    ring0 = torch.full((w,), -1)
    for p in range(p0 - w, p0):
        ring0[p % w] = p
    cache_pos = torch.stack([ring0, torch.full((w,), -1), torch.tensor([0, 1, 2, -1, -1])])
    q_pos = torch.tensor([p0, 0, 0 if t % 2 else 3])
    q = torch.randn(3, h, hd, generator=g) * hd**-0.5
    k, v = torch.randn(2, 3, hd, generator=g)
    cache_k, cache_v = torch.randn(2, 3, w, hd, generator=g)
    cast = [x.to(dtype) for x in (q, k, v, cache_k, cache_v)]
    return [*cast, cache_pos, q_pos, w]


def rglru_gates_inputs(t, dtype, g):
    """x and the two gates' pre-activations (3, t, 8), a_param (8,), the positions of
    `positions` (a document start mid-row 0, left padding in row 1) and their pad mask."""
    x, gate_x, gate_a = (torch.randn(3, t, 8, generator=g).to(dtype) for _ in range(3))
    a_param = torch.randn(8, generator=g).to(dtype)
    pos = positions(t)
    return [x, gate_x, gate_a, a_param, pos, pos < 0]


def linear_cross_entropy_inputs(t, dtype, g):
    """Hidden states (2, t, 16), a tied embedding of 40 tokens scaled so the soft-cap
    of 5 bites, targets, a loss mask with unlearned positions, chunks of 5 rows."""
    h = torch.randn(2, t, 16, generator=g)
    weight = torch.randn(40, 16, generator=g) * 0.5
    targets = torch.randint(0, 40, (2, t), generator=g)
    mask = (torch.rand(2, t, generator=g) > 0.3).float()
    return [h.to(dtype), weight.to(dtype), targets, mask, 5.0, 5]


def linear_epilogue_inputs(t, dtype, g):
    """x (2, t, 32) (more than 64 rows from t = 33: the oneDNN path in bfloat16), the
    "mul" epilogue with a gate (2, t, 48); gradients in tests/ops/test_epilogue.py."""
    x = torch.randn(2, t, 32, generator=g) / 32**0.5
    w, b = torch.randn(48, 32, generator=g), torch.randn(48, generator=g)
    gate = torch.randn(2, t, 48, generator=g)
    return [x.to(dtype), w.to(dtype), b.to(dtype), "mul", gate.to(dtype)]


#: op -> (inputs for (t, dtype, generator), positions of the inputs to differentiate)
CASES = {
    "scan": (scan_inputs, (0, 1, 2)),
    "conv1d": (conv1d_inputs, (0, 2, 3, 4)),
    "attention": (attention_inputs, (0, 1, 2)),
    "linear": (linear_inputs, ()),
    "int8_matmul": (int8_matmul_inputs, ()),
    "int4_matmul": (int4_matmul_inputs, ()),
    "decode_attention": (decode_attention_inputs, (0, 1, 2, 3, 4)),
    "rglru_gates": (rglru_gates_inputs, (0, 1, 2, 3)),
    "linear_cross_entropy": (linear_cross_entropy_inputs, (0, 1)),
    "linear_epilogue": (linear_epilogue_inputs, ()),
}
FAST = [(op, impl) for op, impls in IMPLEMENTATIONS.items() for impl in impls if impl != "ref"]


def run(fn, inputs, grad_args):
    """fn on cloned inputs -> (outputs tuple, gradients of a fixed random projection)."""
    args = [
        a.detach().clone().requires_grad_(i in grad_args) if isinstance(a, Tensor) else a
        for i, a in enumerate(inputs)
    ]
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    if not grad_args:
        return outs, ()
    g = torch.Generator().manual_seed(123)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, [args[i] for i in grad_args])


def test_every_op_has_a_reference_and_a_case():
    assert set(CASES) == set(IMPLEMENTATIONS)
    assert all("ref" in impls for impls in IMPLEMENTATIONS.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "bfloat16"])
@pytest.mark.parametrize("t", LENGTHS)
@pytest.mark.parametrize("op, impl", FAST, ids=[f"{op}-{impl}" for op, impl in FAST])
def test_implementation_equals_reference(op, impl, t, dtype, assert_close):
    make, grad_args = CASES[op]
    inputs = make(t, dtype, torch.Generator().manual_seed(t))
    ref_outs, ref_grads = run(IMPLEMENTATIONS[op]["ref"], inputs, grad_args)
    outs, grads = run(IMPLEMENTATIONS[op][impl], inputs, grad_args)
    # The int8 kernel computes in bfloat16 whatever the input dtype.
    tol = torch.bfloat16 if op in ("int8_matmul", "int4_matmul") else dtype
    assert len(outs) == len(ref_outs)
    for name, out, ref in zip(("output", "final state"), outs, ref_outs):
        assert out.dtype == ref.dtype and torch.isfinite(out).all(), name
        assert_close(out, ref, tol, "out", f"{op}/{impl} {name}")
    for i, grad, ref in zip(grad_args, grads, ref_grads):
        assert torch.isfinite(grad).all() and ref.abs().sum() > 0
        assert_close(grad, ref, tol, "grad", f"{op}/{impl} gradient of input {i}")


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS["conv1d"]))
def test_conv1d_cuts_at_document_starts_and_padding(impl):
    """After segment_pos 0 the output is the new document's alone (a zero state);
    padded positions output only the bias."""
    x, _, conv_state, w, b = conv1d_inputs(9, torch.float32, torch.Generator().manual_seed(0))
    pos = torch.tensor([[-1, -1, 7, 8, 0, 1, 2, 3, 4]] * 3)
    out, state = ops.conv1d(x, pos, conv_state, w, b, impl=impl)
    alone, _ = ops.conv1d(x[:, 4:], pos[:, 4:], torch.zeros_like(conv_state), w, b, impl="ref")
    torch.testing.assert_close(out[:, 4:], alone)
    torch.testing.assert_close(out[:, :2], b.expand(3, 2, 8))
    assert torch.equal(state, x[:, -3:])


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS["attention"]))
def test_attention_padded_query_sees_only_itself(impl):
    """A left-padded query (segment_pos -1) has no valid key but itself: its output is
    its own value, never NaN."""
    q, k, v, pos, k_pos, doc, k_doc, window, offset = attention_inputs(
        7, torch.float32, torch.Generator().manual_seed(0)
    )
    out = ops.local_attention(q, k, v, pos, k_pos, doc, k_doc, window, offset, impl=impl)
    pad = pos[1] < 0  # row 1's first two queries
    assert pad.sum() == 2
    own = v[1, offset : offset + 7][pad]  # (2, hd)
    torch.testing.assert_close(out[1][pad], own[:, None].expand(-1, q.shape[2], -1))


# ----------------------------------------------------------------------------------
# The dispatcher
# ----------------------------------------------------------------------------------
CFG = GriffinConfig.preset("test-tiny")


def _spy_on_every_implementation(monkeypatch) -> list[tuple[str, str]]:
    calls = []
    for op, impls in IMPLEMENTATIONS.items():
        for name, fn in list(impls.items()):

            def spy(*args, _fn=fn, _key=(op, name)):
                calls.append(_key)
                return _fn(*args)

            monkeypatch.setitem(impls, name, spy)
    ops.reset()  # rebuild the per-device tables with the spies
    return calls


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_forcing_references_gives_the_logits_of_auto(kind, monkeypatch):
    """`use("ref")` and RGEMMA_OPS=ref run only the references, and the model's
    logits (packed documents, left padding, then a batch-1 decode step) equal auto's."""
    model = random_model(CFG, seed=4, std=0.1)
    if kind == "bfloat16":
        model = model.to(torch.bfloat16)
    elif kind == "int8":
        model = quantize(model)
    tokens = torch.randint(0, CFG.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(12), torch.arange(9)])[None].repeat(2, 1)
    pos[1, :5] = -1
    pos[1, 5:] = torch.arange(16)
    calls = _spy_on_every_implementation(monkeypatch)

    def logits():
        calls.clear()
        with torch.no_grad():
            prefill, state = model(tokens, pos)
            step, _ = model.decode_step(tokens[:1, -1], state.select(0))
        return torch.cat([prefill.flatten(0, 1), step])

    auto = logits()
    assert {name for _, name in calls} - {"ref"}  # auto runs fast paths here
    with ops.use("ref"):
        forced = logits()
    assert calls and {name for _, name in calls} == {"ref"}
    monkeypatch.setenv("RGEMMA_OPS", "ref")
    ops.reset()
    from_env = logits()
    assert calls and {name for _, name in calls} == {"ref"}
    # float32: rounding order only (5e-7 measured); bfloat16 and int8 paths round
    # differently (0.016 and 0.008 measured on logits up to 3.7).
    tol = {"float32": 1e-5, "bfloat16": 0.06, "int8": 0.03}[kind]
    torch.testing.assert_close(forced, auto, rtol=0, atol=tol)
    torch.testing.assert_close(from_env, forced, rtol=0, atol=0)


def test_use_describe_and_precedence(monkeypatch):
    assert ops.describe() == ops.AUTO["cpu"] == ops.describe(torch.device("cpu"))
    assert ops.describe("mps") == ops.AUTO["cuda"]
    # CUDA also takes the Triton kernels where `rgemma.ops.triton` imports.
    triton = dict.fromkeys(ops._triton_kernels(), "triton")
    assert ops.describe("cuda") == {**ops.AUTO["cuda"], **triton}
    every_ref = dict.fromkeys(IMPLEMENTATIONS, "ref")
    with ops.use("ref"):
        assert ops.describe() == ops.describe("cuda") == every_ref
        with ops.use(attention="sdpa"):
            assert ops.describe() == {**every_ref, "attention": "sdpa"}
        assert ops.describe() == every_ref
        # The call's own impl= comes first.
        assert ops.resolve("scan", "cpu", impl="chunked") == "chunked"
    assert ops.describe() == ops.AUTO["cpu"]
    # Python choices come before RGEMMA_OPS; "auto" undoes a choice.
    monkeypatch.setenv("RGEMMA_OPS", "scan=ref, conv1d=ref")
    ops.reset()
    assert ops.describe() == {**ops.AUTO["cpu"], "scan": "ref", "conv1d": "ref"}
    ops.use("scan=chunked")  # a plain call lasts
    assert ops.resolve("scan") == "chunked" and ops.resolve("conv1d") == "ref"
    ops.use(scan="auto")
    assert ops.resolve("scan") == "ref"


def test_rgemma_ops_in_a_fresh_process():
    env = {**os.environ, "RGEMMA_OPS": "scan=ref,attention=sdpa"}
    code = "from rgemma import ops; print(sorted(ops.describe().items()))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    want = {**ops.AUTO["cpu"], "scan": "ref", "attention": "sdpa"}
    assert out.strip() == str(sorted(want.items()))


def test_bad_names_are_one_line_errors(monkeypatch):
    cases = [
        (lambda: ops.use(scan="nope"), "unknown scan impl 'nope'; choose from auto, ref, chunked"),
        (
            lambda: ops.use(scn="ref"),
            "unknown op 'scn'; choose from scan, conv1d, attention, linear, int8_matmul",
        ),
        (lambda: ops.use("sdpa"), "use: unknown scan impl 'sdpa'; choose from auto, ref, chunked"),
        (lambda: ops.use("conv1d="), "use: unknown conv1d impl ''; choose from auto, ref, shifted"),
        (
            lambda: ops.linear(torch.ones(1, 2), torch.ones(3, 2), impl="gemv"),
            "unknown linear impl 'gemv'; choose from auto, ref, mv",
        ),
        (lambda: ops.resolve("softmax"), "unknown op 'softmax'; choose from scan, conv1d"),
    ]
    for call, message in cases:
        with pytest.raises(InputError) as err:
            call()
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert ops.describe() == ops.AUTO["cpu"]  # a refused use() changed nothing
    # A bad RGEMMA_OPS is reported at the first op, naming the variable.
    monkeypatch.setenv("RGEMMA_OPS", "attention=flash")
    ops.reset()
    model = random_model(CFG)
    with pytest.raises(InputError, match=r"^RGEMMA_OPS: unknown attention impl 'flash'; ch"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_a_triton_module_plugs_into_auto_on_cuda_only(monkeypatch):
    """The slot for GPU kernels: a `rgemma.ops.triton` module with KERNELS becomes the
    "triton" implementation, chosen by auto on CUDA, selectable by name."""
    calls = []

    def scan_kernel(a, x, h0):
        calls.append(x.shape)
        return IMPLEMENTATIONS["scan"]["ref"](a, x, h0)

    fake = types.ModuleType("rgemma.ops.triton")
    fake.KERNELS = {"scan": scan_kernel}
    monkeypatch.setitem(sys.modules, "rgemma.ops.triton", fake)
    monkeypatch.setattr(ops, "_triton", None)
    ops.reset()
    assert ops.describe("cuda") == {**ops.AUTO["cuda"], "scan": "triton"}
    assert ops.describe("cpu") == ops.AUTO["cpu"]
    a, x, h0 = scan_inputs(5, torch.float32, torch.Generator().manual_seed(0))
    _y, h = ops.linear_scan(a, x, h0, impl="triton")
    assert calls == [x.shape]
    torch.testing.assert_close(h, IMPLEMENTATIONS["scan"]["ref"](a, x, h0)[1])
