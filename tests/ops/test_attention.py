"""Attention prefill: the blocked SDPA path equals the reference (outputs and
gradients, packed documents, padding, a window that cuts, a ring of earlier keys), and
a fresh prefill that slices its keys from the new tokens (no ring) gives the logits,
state and gradients of the ring path, in one call or in query chunks."""

import pytest
import torch
from oracle import random_model

import rgemma.model as model_mod
from rgemma import GriffinConfig
from rgemma.config import BlockType
from rgemma.ops import attention as attn

H, HD = 2, 8


def _layout(t: int, kind: str) -> torch.Tensor:
    """(2, t) segment_pos: packed documents (restarts at 0), left or right padding, or
    padding between real tokens (inner)."""
    pos = torch.stack([torch.arange(t), torch.arange(t) + 5])
    pos[0, t // 3 :] = torch.arange(t - t // 3)  # a second document in row 0
    pos[1, (2 * t) // 3 :] = torch.arange(t - (2 * t) // 3)
    if kind == "left_pad":
        pos[:, :4] = -1
    elif kind == "right_pad":
        pos[1, -5:] = -1
    elif kind == "inner_pad":
        pos[0, t // 2 : t // 2 + 3] = -1
    return pos


def _attention_case(t, ring, dtype, g, kind="packed", window=9):
    """q, k, v and masks for t queries over `ring` earlier keys (positions just before
    the new tokens, same document) followed by the t new keys."""
    pos = _layout(t, kind)
    doc = torch.cumsum((pos == 0).long(), dim=1)
    ring_pos = torch.arange(ring).expand(2, ring) + pos[:, :1].clamp(min=0) - ring
    ring_pos = ring_pos.masked_fill(ring_pos < 0, -1)
    k_pos = torch.cat([ring_pos, pos], dim=1)
    k_doc = torch.cat([torch.zeros_like(ring_pos), doc], dim=1)
    q = torch.randn(2, t, H, HD, generator=g) * HD**-0.5
    k, v = torch.randn(2, 2, ring + t, HD, generator=g)
    return [q.to(dtype), k.to(dtype), v.to(dtype), pos, k_pos, doc, k_doc, window, ring]


def _run(fn, inputs):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs[:3]]
    out = fn(*leaves, *inputs[3:])
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((out.float() * w).sum(), leaves)
    return out, grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("t, ring", [(7, 0), (33, 0), (130, 0), (33, 6)])
@pytest.mark.parametrize("kind", ["packed", "left_pad", "right_pad", "inner_pad"])
def test_blocked_equals_reference(dtype, t, ring, kind, monkeypatch, assert_close):
    """Blocks of 4 queries (so spans start and stop inside the window, documents and
    padding), every block the reference over its span: outputs and gradients of q, k,
    v."""
    monkeypatch.setattr(attn, "QUERY_BLOCK", 4)
    inputs = _attention_case(t, ring, dtype, torch.Generator().manual_seed(t), kind)
    out_ref, grads_ref = _run(attn.local_attention_ref, inputs)
    out, grads = _run(attn.local_attention_blocked, inputs)
    assert out.dtype == out_ref.dtype
    assert_close(out, out_ref, dtype, "out", "output")
    for name, got, want in zip("qkv", grads, grads_ref):
        assert_close(got, want, dtype, "grad", f"gradient of {name}")


def test_blocked_skips_keys_outside_each_block_span(monkeypatch):
    """From a fresh state with packed documents each block gets only the keys it can
    see: fewer than half of the (query, key) pairs of one dense call."""
    monkeypatch.setattr(attn, "QUERY_BLOCK", 8)
    pairs = []
    real = attn.local_attention_ref

    def spy(q, k, *args):
        pairs.append(q.shape[1] * k.shape[1])
        return real(q, k, *args)

    monkeypatch.setattr(attn, "local_attention_ref", spy)
    inputs = _attention_case(64, 0, torch.float32, torch.Generator().manual_seed(0), window=16)
    attn.local_attention_blocked(*inputs)
    assert len(pairs) == 8 and sum(pairs) < 0.5 * 64 * 64


# ----------------------------------------------------------------------------------
# The model's fresh prefill: keys sliced from the new tokens, no ring
# ----------------------------------------------------------------------------------
CFG = GriffinConfig.preset("test-tiny")  # window 8


@pytest.mark.parametrize(
    "kind, in_order",
    [("packed", True), ("left_pad", True), ("right_pad", True), ("inner_pad", False)],
)
def test_keys_in_order(kind, in_order):
    assert bool(model_mod._keys_in_order(_layout(30, kind))) is in_order
    falling = torch.tensor([[0, 1, 2, 1, 2]])  # a position falls inside a document
    assert not bool(model_mod._keys_in_order(falling))


def _forward(model, tokens, pos, direct: bool, chunk: int):
    """Logits, the returned state and every parameter's gradient, in query chunks of
    `chunk`, with the fresh path on (`direct`) or forced onto the ring path."""
    with pytest.MonkeyPatch.context() as m:
        m.setattr(model_mod, "ATTENTION_QUERY_CHUNK", chunk)
        if not direct:
            m.setattr(model_mod, "_keys_in_order", lambda p: torch.tensor(False))
        model.zero_grad()
        logits, state = model(tokens, pos)
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    real = (pos >= 0)[..., None]
    (logits * w * real).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logits.detach() * real, state, grads


@pytest.mark.parametrize("kind", ["packed", "left_pad", "right_pad", "inner_pad"])
@pytest.mark.parametrize("chunk", [6, 1024])
def test_fresh_prefill_equals_the_ring_path(kind, chunk, monkeypatch):
    """40 tokens, window 8, query chunks of 6 (so chunks reach back across chunk
    boundaries and beyond the window) or one call: logits, state and gradients of
    the fresh path equal the ring path's (padding between real tokens takes the ring
    path either way). Gradients reach ~300: summation order differs by ~1e-4."""
    model = random_model(CFG, seed=2, std=0.2).train()
    pos = _layout(40, kind)
    tokens = torch.randint(0, CFG.vocab_size, pos.shape, generator=torch.Generator().manual_seed(1))
    writes = []
    real_write = model_mod._ring_write
    with monkeypatch.context() as m:
        m.setattr(
            model_mod, "_ring_write", lambda *a: writes.append(a[1][0].shape[1]) or real_write(*a)
        )
        logits, state, grads = _forward(model, tokens, pos, True, chunk)
    n_attn = sum(b.block_type == BlockType.ATTENTION for b in model.blocks)
    assert n_attn >= 1
    if kind != "inner_pad":  # one write of all 40 tokens per attention block
        assert writes == [40] * n_attn
    logits_ring, state_ring, grads_ring = _forward(model, tokens, pos, False, chunk)
    torch.testing.assert_close(logits, logits_ring, rtol=1e-5, atol=1e-5)
    for got, want in zip(state.blocks, state_ring.blocks):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ring[name], rtol=1e-4, atol=1e-4, msg=name)


def test_fresh_prefill_then_continuation_equals_one_call(monkeypatch):
    """The state a fresh (sliced) prefill returns continues exactly: 30 tokens in
    chunks of 6, then 10 more (the ring path) and a decode step, give the logits of
    one 41-token call."""
    monkeypatch.setattr(model_mod, "ATTENTION_QUERY_CHUNK", 6)
    model = random_model(CFG, seed=3, std=0.2)
    tokens = torch.randint(0, CFG.vocab_size, (2, 41), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole, _ = model(tokens)
        first, state = model(tokens[:, :30])
        second, state = model(tokens[:, 30:40], state=state)
        step, _ = model(tokens[:, 40:], state=state)
    torch.testing.assert_close(torch.cat([first, second, step], dim=1), whole, rtol=1e-5, atol=1e-5)
