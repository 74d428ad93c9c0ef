"""The chunked head + loss equals the full-logits reference: value and the gradients
of h and of the tied embedding, float32, bfloat16 and bf16 autocast over float32
parameters, any chunk size, unlearned positions, no soft-cap; it never builds a
(tokens x vocab) tensor; and the training objective that uses it equals the loss of
the model's own logits."""

import pytest
import torch
from oracle import random_model
from torch.utils._python_dispatch import TorchDispatchMode

from rgemma import GriffinConfig, InputError, ops
from rgemma.ops.loss import linear_cross_entropy_chunked, linear_cross_entropy_ref
from rgemma.training.loss import masked_loss
from rgemma.training.objective import LMObjective

V, D = 300, 32


def _inputs(b=2, t=37, seed=0, unlearned=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.7  # logits up to ~15: the cap of 5 bites
    targets = torch.randint(0, V, (b, t), generator=g)
    mask = (torch.rand(b, t, generator=g) >= unlearned).float()
    return h, weight, targets, mask


def _run(fn, h, weight, targets, mask, cap, mode, **kw):
    """(loss, grad h, grad weight) of fn on fresh leaves; `mode`: float32, bfloat16
    (parameters and activations) or autocast (float32 leaves, bf16 autocast)."""
    dtype = torch.bfloat16 if mode == "bfloat16" else torch.float32
    h, weight = (v.to(dtype).requires_grad_(True) for v in (h, weight))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        loss = fn(h, weight, targets, mask, cap, **kw)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


@pytest.mark.parametrize("mode", ["float32", "bfloat16", "autocast"])
@pytest.mark.parametrize("chunk_size", [1, 7, None])
@pytest.mark.parametrize("cap", [5.0, None])
def test_chunked_equals_reference(mode, chunk_size, cap, assert_close):
    inputs = _inputs()
    ref = _run(linear_cross_entropy_ref, *inputs, cap, mode)
    out = _run(linear_cross_entropy_chunked, *inputs, cap, mode, chunk_size=chunk_size)
    assert out[0].dtype == torch.float32 and out[0].ndim == 0
    tol = torch.float32 if mode == "float32" else torch.bfloat16
    for name, got, want in zip(("loss", "grad h", "grad weight"), out, ref):
        assert got.dtype == want.dtype, name
        assert_close(got, want, tol, "out" if name == "loss" else "grad", f"{mode} {name}")
    assert ref[2].abs().sum() > 0


def test_autocast_rounds_the_logits_as_the_model_head():
    """Under autocast the matmul runs in bfloat16 (as `Embedder.decode`): the loss
    differs from float32's by bf16 rounding, and equals the bf16 reference closely."""
    inputs = _inputs(t=64, unlearned=0.0)
    f32 = _run(linear_cross_entropy_chunked, *inputs, 30.0, "float32")[0]
    amp = _run(linear_cross_entropy_chunked, *inputs, 30.0, "autocast")[0]
    amp_ref = _run(linear_cross_entropy_ref, *inputs, 30.0, "autocast")[0]
    # 0.09 from float32 (of 1491), 1e-4 from the bf16 reference (float32 sum order).
    assert (amp - f32).abs() > 0.03
    torch.testing.assert_close(amp, amp_ref, rtol=0, atol=1e-3)


def test_unlearned_positions_add_nothing():
    """A 0 in loss_mask: the position's hidden state gets a zero gradient and its
    value does not change the loss; fractional weights scale the position's share."""
    h, weight, targets, mask = _inputs(unlearned=0.5)
    mask[0, :3] = torch.tensor([0.5, 2.0, 0.25])
    loss, grad_h, _ = _run(linear_cross_entropy_chunked, h, weight, targets, mask, 30.0, "float32")
    assert torch.all(grad_h[mask == 0] == 0) and grad_h[mask != 0].abs().sum() > 0
    h2 = torch.where((mask == 0)[..., None], torch.randn_like(h) * 100, h)
    with torch.no_grad():
        loss2 = linear_cross_entropy_chunked(h2, weight, targets, mask, 30.0)
    torch.testing.assert_close(loss2, loss)
    ref = _run(linear_cross_entropy_ref, h, weight, targets, mask, 30.0, "float32")
    torch.testing.assert_close(loss, ref[0])
    torch.testing.assert_close(grad_h, ref[1], rtol=1e-4, atol=1e-5)


def test_no_grad_and_two_dimensional_inputs():
    h, weight, targets, mask = _inputs()
    want = linear_cross_entropy_ref(h, weight, targets, mask, 30.0)
    with torch.no_grad():
        got = linear_cross_entropy_chunked(h, weight, targets, mask, 30.0, chunk_size=4)
    flat = linear_cross_entropy_chunked(
        h.reshape(-1, D), weight, targets.reshape(-1), mask.reshape(-1), 30.0, chunk_size=4
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(flat, want)
    # All positions unlearned: zero loss, zero gradients.
    h.requires_grad_(True)
    none = linear_cross_entropy_chunked(h, weight, targets, torch.zeros_like(mask), 30.0)
    none.backward()
    assert none.item() == 0.0 and torch.all(h.grad == 0)


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, tuple | list) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


@pytest.mark.parametrize("mode", ["float32", "autocast"])
def test_no_tokens_by_vocabulary_tensor(mode):
    """Forward and backward of the chunked op never return a tensor of n x v elements
    (here the largest is a chunk's 16 x v logits, or the (v, d) gradient); the
    reference does."""
    h, weight, targets, mask = _inputs(b=2, t=64)
    n = h.shape[0] * h.shape[1]
    sizes = {}
    for name, fn in (("ref", linear_cross_entropy_ref), ("chunked", linear_cross_entropy_chunked)):
        with _LargestTensor() as seen:
            kw = {"chunk_size": 16} if name == "chunked" else {}
            _run(fn, h, weight, targets, mask, 30.0, mode, **kw)
        sizes[name] = seen.largest
    assert sizes["ref"] >= n * V
    assert sizes["chunked"] == max(16 * V, V * D)


def test_bad_inputs_are_one_line_errors():
    h, weight, targets, mask = _inputs()
    cases = [
        (lambda: ops.linear_cross_entropy(h[0, 0], weight, targets, mask), "h must be (n, d)"),
        (lambda: ops.linear_cross_entropy(h, weight[:, :5], targets, mask), "weight must be"),
        (lambda: ops.linear_cross_entropy(h, weight, targets[:, 1:], mask), "targets must"),
        (lambda: ops.linear_cross_entropy(h, weight, targets, mask[0]), "loss_mask must"),
        (
            lambda: ops.linear_cross_entropy(h, weight.bfloat16(), targets, mask),
            "h (torch.float32) and weight (torch.bfloat16) must have one dtype",
        ),
        (
            lambda: ops.linear_cross_entropy(h, weight, targets, mask, chunk_size=0),
            "chunk_size must be >= 1",
        ),
    ]
    for call, message in cases:
        with pytest.raises(InputError) as err:
            call()
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_backward_runs_once():
    h, weight, targets, mask = _inputs()
    h.requires_grad_(True)
    loss = linear_cross_entropy_chunked(h, weight, targets, mask, 30.0)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward runs once"):
        loss.backward()


@pytest.mark.parametrize("autocast", [False, True])
def test_objective_equals_the_loss_of_the_model_logits(autocast):
    """`LMObjective` (the fused op) gives the loss and every parameter's gradient of
    `masked_loss` over the model's own soft-capped logits (packed documents)."""
    cfg = GriffinConfig.preset("test-tiny")
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    pos = torch.cat([torch.arange(10), torch.arange(14)]).expand(2, 24)
    targets = torch.randint(0, cfg.vocab_size, (2, 24), generator=g)
    mask = (torch.rand(2, 24, generator=g) > 0.2).float()
    results = []
    for fused in (True, False):
        model = random_model(cfg, seed=1, std=0.1).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss, _ = LMObjective(model)(tokens, pos, targets, mask)
            else:
                logits, _ = model(tokens, pos)
                loss, _ = masked_loss(logits, targets, mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(loss, ref_loss, **tol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], **tol, msg=name)
