"""The model: parity with the official implementation on random weights, and the
invariants (chunked prefill, decode, batching, packing, fixed-size state)."""

import dataclasses
import importlib
import itertools

import pytest
import torch
from oracle import random_model, random_pair

import rgemma.model as model_mod
from rgemma import GriffinConfig, InputError
from rgemma.config import BlockType
from rgemma.model import Griffin
from rgemma.state import concat_states, load_state, save_state

TOL = {"rtol": 0, "atol": 1e-4}

# Every block kind, window 8, so 40+ token sequences exceed the window.
CFG = GriffinConfig.preset("test-tiny")
# Attention first and last, LRU width != width, 3 heads, no soft-cap or embedding scale.
CFG_ODD = dataclasses.replace(
    CFG,
    width=48,
    lru_width=36,
    num_heads=3,
    block_types=(BlockType.ATTENTION, BlockType.RECURRENT, BlockType.ATTENTION),
    embeddings_scale_by_sqrt_dim=False,
    logits_soft_cap=None,
    attention_window_size=5,
)


def official_logits(official, tokens, segment_pos):
    with torch.no_grad():
        logits, _ = official(tokens, segment_pos)
    return logits.float()


@pytest.fixture(scope="module", params=[CFG, CFG_ODD], ids=["tiny", "odd"])
def pair(request):
    return random_pair(request.param, seed=1)


def test_parity_single_sequence(pair):
    official, ours = pair
    tokens = torch.randint(0, CFG.vocab_size, (1, 6))
    pos = torch.arange(6)[None]
    with torch.no_grad():
        logits, _ = ours(tokens, pos)
    assert logits.dtype == torch.float32 and logits.shape == (1, 6, CFG.vocab_size)
    torch.testing.assert_close(logits, official_logits(official, tokens, pos), **TOL)


def test_parity_longer_than_window(pair):
    official, ours = pair
    tokens = torch.randint(0, CFG.vocab_size, (2, 47))
    pos = torch.arange(47).expand(2, -1)
    with torch.no_grad():
        logits, _ = ours(tokens)  # default segment_pos = arange
    torch.testing.assert_close(logits, official_logits(official, tokens, pos), **TOL)


def test_parity_packed_documents(pair):
    official, ours = pair
    tokens = torch.randint(0, CFG.vocab_size, (2, 44))
    pos = torch.cat([torch.arange(13), torch.arange(20), torch.arange(11)])[None].repeat(2, 1)
    pos[1] = torch.cat([torch.arange(30), torch.arange(14)])
    with torch.no_grad():
        logits, _ = ours(tokens, pos)
    torch.testing.assert_close(logits, official_logits(official, tokens, pos), **TOL)


def test_parity_left_padded_batch(pair):
    official, ours = pair
    lengths = [41, 5, 1, 20]
    T = max(lengths)
    tokens = torch.randint(0, CFG.vocab_size, (len(lengths), T))
    pos = torch.full((len(lengths), T), -1)
    for i, n in enumerate(lengths):
        pos[i, T - n :] = torch.arange(n)
    with torch.no_grad():
        logits, _ = ours(tokens, pos)
    ref = official_logits(official, tokens, pos)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(logits[i, T - n :], ref[i, T - n :], **TOL)
        # And each row equals that sequence alone.
        with torch.no_grad():
            alone, _ = ours(tokens[i : i + 1, T - n :])
        torch.testing.assert_close(logits[i, T - n :], alone[0], **TOL)


def _model(cfg=CFG, seed=2):
    return random_model(cfg, seed=seed)


@pytest.mark.parametrize("cfg", [CFG, CFG_ODD], ids=["tiny", "odd"])
def test_chunked_prefill_and_decode_equal_full_forward(cfg):
    model = _model(cfg)
    T = 53
    tokens = torch.randint(0, cfg.vocab_size, (3, T))
    with torch.no_grad():
        full, full_state = model(tokens)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):  # random chunkings
            cuts = sorted(torch.randperm(T - 1, generator=g)[:6].add(1).tolist())
            bounds = [0, *cuts, T]
            state, outs = None, []
            for a, b in itertools.pairwise(bounds):
                out, state = model(tokens[:, a:b], state=state)
                outs.append(out)
            torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
        # Prefill 10 tokens, then one decode step at a time.
        out, state = model(tokens[:, :10])
        outs = [out]
        for t in range(10, T):
            out, state = model(tokens[:, t : t + 1], state=state)
            outs.append(out)
        torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
        for s_full, s_step in zip(full_state.blocks, state.blocks):
            for a, b in zip(s_full, s_step):
                torch.testing.assert_close(a.float(), b.float(), **TOL)


def test_multi_turn_continuation_with_document_starts():
    """Continuing a state across packed documents and turns equals one pass."""
    model = _model()
    tokens = torch.randint(0, CFG.vocab_size, (2, 60))
    pos = torch.cat([torch.arange(25), torch.arange(17), torch.arange(18)])[None].repeat(2, 1)
    with torch.no_grad():
        full, _ = model(tokens, pos)
        state, outs = None, []
        for a, b in [(0, 20), (20, 26), (26, 27), (27, 43), (43, 60)]:
            out, state = model(tokens[:, a:b], pos[:, a:b], state)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)


def test_two_packed_documents_equal_each_alone():
    model = _model()
    d1, d2 = torch.randint(0, CFG.vocab_size, (1, 19)), torch.randint(0, CFG.vocab_size, (1, 23))
    pos = torch.cat([torch.arange(19), torch.arange(23)])[None]
    with torch.no_grad():
        packed, _ = model(torch.cat([d1, d2], 1), pos)
        a, _ = model(d1)
        b, _ = model(d2)
    torch.testing.assert_close(packed, torch.cat([a, b], 1), **TOL)


def test_batch_equals_rows_alone_and_state_rows():
    model = _model()
    tokens = torch.randint(0, CFG.vocab_size, (3, 30))
    with torch.no_grad():
        out, state = model(tokens)
        states = []
        for i in range(3):
            alone, s = model(tokens[i : i + 1])
            torch.testing.assert_close(out[i : i + 1], alone, **TOL)
            states.append(s)
        # Rows taken out of a batch state, or states merged into one, continue exactly.
        nxt = torch.randint(0, CFG.vocab_size, (3, 4))
        merged_out, _ = model(nxt, state=concat_states(states))
        batch_out, _ = model(nxt, state=state)
        row_out, _ = model(nxt[1:2], state=state.select(1))
    torch.testing.assert_close(merged_out, batch_out, **TOL)
    torch.testing.assert_close(row_out, batch_out[1:2], **TOL)


def test_state_size_is_fixed():
    model = _model()
    with torch.no_grad():
        _, s10 = model(torch.randint(0, CFG.vocab_size, (1, 10)))
        _, s10k = model(torch.randint(0, CFG.vocab_size, (1, 10_000)), logits="none")
    assert s10.nbytes() == s10k.nbytes() == model.state_nbytes(1) > 0
    for a, b in zip(s10.blocks, s10k.blocks):
        assert [t.shape for t in a] == [t.shape for t in b]


def test_state_save_and_load(tmp_path):
    model = _model()
    tokens = torch.randint(0, CFG.vocab_size, (2, 25))
    with torch.no_grad():
        full, _ = model(tokens)
        _, state = model(tokens[:, :17])
        save_state(state.select(1), tmp_path / "s.safetensors", CFG)
        loaded = load_state(tmp_path / "s.safetensors", CFG)
        out, _ = model(tokens[1:, 17:], state=loaded)
    torch.testing.assert_close(out, full[1:, 17:], **TOL)
    with pytest.raises(InputError, match="another model config"):
        load_state(tmp_path / "s.safetensors", CFG_ODD)


def test_logits_modes():
    model = _model()
    tokens = torch.randint(0, CFG.vocab_size, (2, 12))
    with torch.no_grad():
        full, _s1 = model(tokens)
        last, s2 = model(tokens, logits="last")
        none, s3 = model(tokens, logits="none")
    assert none is None and last.shape == (2, 1, CFG.vocab_size)
    torch.testing.assert_close(last, full[:, -1:])
    torch.testing.assert_close(s2.blocks[0].rg_lru, s3.blocks[0].rg_lru)


def test_gradients_flow_to_every_parameter():
    model = _model().train()
    tokens = torch.randint(0, CFG.vocab_size, (2, 20))
    pos = torch.cat([torch.arange(12), torch.arange(8)])[None].repeat(2, 1)
    logits, _ = model(tokens, pos)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    # Activation checkpointing (applied from outside): tests/test_train_distributed.py.


def test_sqrt_bound_derivative_caps_gradient():
    x = torch.tensor([0.0, 1e-12, 0.25], requires_grad=True)
    model_mod._SqrtBoundDerivative.apply(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([1000.0, 1000.0, 1.0]))


def test_rg_lru_a_param_init_is_the_official_ring():
    """`init_rg_lru_a_param`: a = exp(-softplus(a_param)) with a^2 uniform in
    [0.9^2, 0.999^2], in place on a trainable parameter of any dtype; used by
    `reset_parameters`."""
    p = torch.nn.Parameter(torch.empty(20_000))
    out = model_mod.init_rg_lru_a_param(p, torch.Generator().manual_seed(0))
    assert out is p and p.requires_grad
    a2 = torch.exp(-2 * torch.nn.functional.softplus(p.detach()))
    assert 0.81 - 1e-5 <= a2.min() < 0.812 and 0.996 < a2.max() <= 0.998 + 1e-5
    assert abs(a2.mean().item() - (0.81 + 0.998) / 2) < 0.005  # uniform: mean mid-ring
    half = model_mod.init_rg_lru_a_param(torch.empty(7, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    # reset_parameters initialises every RG-LRU with it.
    model = Griffin(CFG)
    model.reset_parameters(seed=5)
    for name, param in model.named_parameters():
        if name.endswith("rg_lru.a_param"):
            a2 = torch.exp(-2 * torch.nn.functional.softplus(param.detach()))
            assert 0.81 - 1e-5 <= a2.min() and a2.max() <= 0.998 + 1e-5, name


def test_bfloat16_model_runs_and_tracks_float32():
    model = _model()
    tokens = torch.randint(0, CFG.vocab_size, (1, 30))
    with torch.no_grad():
        ref, _ = model(tokens)
        out, state = model.to(torch.bfloat16)(tokens)
    assert out.dtype == torch.float32 and state.blocks[0].rg_lru.dtype == torch.float32
    assert (out - ref).abs().max() < 0.5


def test_long_prompt_attention_memory_is_bounded(monkeypatch):
    """A 32,768-token prompt on a 2-layer, width-256 model: the attention logits are
    never larger than chunk x (window + chunk)."""
    cfg = GriffinConfig(
        vocab_size=256,
        width=256,
        mlp_expanded_width=512,
        num_heads=4,
        block_types=(BlockType.RECURRENT, BlockType.ATTENTION),
        attention_window_size=2048,
    )
    model = Griffin(cfg).eval()
    chunk = model_mod.ATTENTION_QUERY_CHUNK
    sizes = []
    real = model_mod.local_attention

    def spy(q, k, *args, **kwargs):
        sizes.append(q.shape[1] * k.shape[1])
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(model_mod, "local_attention", spy)
    tokens = torch.randint(0, 256, (1, 32_768))
    with torch.no_grad():
        logits, _state = model(tokens, logits="last")
    assert torch.isfinite(logits).all()
    assert len(sizes) == 32_768 // chunk
    assert max(sizes) <= chunk * (cfg.attention_window_size + chunk)


# ---------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = _model()
    ok = torch.randint(0, CFG.vocab_size, (2, 5))
    with pytest.raises(InputError, match="token id 256 is out of range"):
        model(torch.full((1, 3), CFG.vocab_size))
    with pytest.raises(InputError, match="token id -1 is out of range"):
        model(torch.full((1, 3), -1))
    with pytest.raises(InputError, match=r"shape \(batch, time\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(InputError, match="integer tensor"):
        model(torch.zeros(1, 5))
    with pytest.raises(InputError, match=r"segment_pos must have the shape of tokens \(2, 5\)"):
        model(ok, torch.arange(5)[None])
    with pytest.raises(InputError, match=r"at least one row and one time step, got shape \(1, 0\)"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="integer tensor, got dtype torch.bool"):
        model(torch.zeros(1, 3, dtype=torch.bool))
    with pytest.raises(InputError, match="segment_pos must be an integer tensor"):
        model(ok, torch.zeros(2, 5))
    with pytest.raises(InputError, match="segment_pos must be >= -1.*got -5"):
        model(ok, torch.full((2, 5), -5))
    with pytest.raises(InputError, match="logits must be 'all', 'last' or 'none', got 'bogus'"):
        model(ok, logits="bogus")
    _, state = model(ok)
    with pytest.raises(InputError, match="batch size 2 but tokens have batch size 1"):
        model(ok[:1], state=state)
    other = _model(CFG_ODD)
    _, other_state = other(ok)
    with pytest.raises(InputError, match="another config"):
        model(ok, state=other_state)


@pytest.mark.parametrize(
    "name,count",
    [
        ("recurrentgemma-2b", 2_682_862_080),
        ("recurrentgemma-9b", 8_579_977_216),
    ],
)
def test_presets_parameter_counts(name, count):
    cfg = GriffinConfig.preset(name)
    model = Griffin(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == count == cfg.num_parameters()


def test_embedding_scale_is_bfloat16_rounded():
    assert GriffinConfig.preset("recurrentgemma-2b").embedding_scale == 50.5
    assert GriffinConfig.preset("recurrentgemma-9b").embedding_scale == 64.0
    assert GriffinConfig.preset("griffin-7b").embedding_scale == 1.0


def test_save_state_to_a_directory_is_refused(tmp_path):
    model = _model()
    _, state = model(torch.randint(0, CFG.vocab_size, (1, 4)))
    with pytest.raises(InputError, match="it is a directory"):
        save_state(state, tmp_path, CFG)


def test_mlp_up_projection_keeps_official_layout_outside():
    """`ffw_up` is two `Linear`s inside (`gate_proj` = official half 0, `up_proj` =
    half 1, (m, d) weights: what PEFT reaches) but the official `ffw_up.w` (2, d, m) and
    `ffw_up.b` (2, 1, 1, m) in and out of state_dict, with the same values; the
    official formula computes the same MLP."""
    cfg = GriffinConfig.preset("test-tiny")
    model = Griffin(cfg).float()
    model.reset_parameters(seed=3)
    with torch.no_grad():
        for p in model.parameters():  # nonzero biases too
            p.add_(torch.randn_like(p) * 0.1)
    d, m = cfg.width, cfg.mlp_expanded_width
    mlp = model.blocks[0].mlp_block
    gate, up = mlp.ffw_up.gate_proj, mlp.ffw_up.up_proj
    assert isinstance(gate, torch.nn.Linear) and isinstance(up, torch.nn.Linear)
    assert tuple(gate.weight.shape) == (m, d) and tuple(up.bias.shape) == (m,)
    names = [n for n, _ in model.named_parameters() if n.startswith("blocks.0.mlp_block.")]
    assert names == [
        "blocks.0.mlp_block.ffw_up.gate_proj.weight",
        "blocks.0.mlp_block.ffw_up.gate_proj.bias",
        "blocks.0.mlp_block.ffw_up.up_proj.weight",
        "blocks.0.mlp_block.ffw_up.up_proj.bias",
        "blocks.0.mlp_block.ffw_down.weight",
        "blocks.0.mlp_block.ffw_down.bias",
    ]
    sd = model.state_dict()
    mlp_keys = [k for k in sd if k.startswith("blocks.0.mlp_block.")]
    assert mlp_keys == [
        "blocks.0.mlp_block.ffw_up.w",
        "blocks.0.mlp_block.ffw_up.b",
        "blocks.0.mlp_block.ffw_down.weight",
        "blocks.0.mlp_block.ffw_down.bias",
    ]
    w, b = sd["blocks.0.mlp_block.ffw_up.w"], sd["blocks.0.mlp_block.ffw_up.b"]
    assert tuple(w.shape) == (2, d, m) and w.is_contiguous() and tuple(b.shape) == (2, 1, 1, m)
    assert torch.equal(w[0], gate.weight.T) and torch.equal(w[1], up.weight.T)
    assert torch.equal(b[0, 0, 0], gate.bias) and torch.equal(b[1, 0, 0], up.bias)
    assert torch.equal(mlp.ffw_up.w, w) and torch.equal(mlp.ffw_up.b, b)
    # A meta model's state_dict has the official shapes too (checkpoint validation).
    meta_sd = Griffin(cfg, device="meta").state_dict()
    assert {k: v.shape for k, v in meta_sd.items()} == {k: v.shape for k, v in sd.items()}
    # Round trip into a model built on the meta device (assign=True, as load_model does).
    other = Griffin(cfg, device="meta")
    other.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    other_up = other.blocks[0].mlp_block.ffw_up
    for half in ("gate_proj", "up_proj"):
        mine, theirs = getattr(mlp.ffw_up, half), getattr(other_up, half)
        assert theirs.weight.is_contiguous() and torch.equal(theirs.weight, mine.weight)
        assert torch.equal(theirs.bias, mine.bias)
    # The internal names (named_parameters) load as well.
    again = Griffin(cfg)
    again.load_state_dict(dict(model.named_parameters()), strict=True)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in sd.items())
    # The MLP equals the official formula on the official layout.
    x = torch.randn(2, 3, d)
    with torch.no_grad():
        ref = mlp.ffw_down(
            torch.nn.functional.gelu(x @ w[0] + b[0, 0, 0], approximate="tanh")
            * (x @ w[1] + b[1, 0, 0])
        )
        torch.testing.assert_close(mlp(x), ref)
    # A checkpoint with a wrong shape is reported under its official key.
    bad = dict(sd)
    bad["blocks.0.mlp_block.ffw_up.w"] = torch.zeros(2, d + 1, m)
    with pytest.raises(RuntimeError, match=r"size mismatch for blocks.0.mlp_block.ffw_up.w"):
        Griffin(cfg).load_state_dict(bad)


def test_state_has_row_major_strides_whatever_the_call_length():
    """The state after a prefill of any length has the strides of a decode step's
    state (size-1 dims included), so a compiled decode step does not recompile per
    prompt length."""
    model = random_model(CFG)

    def strides(state):
        return [t.stride() for t in [state.next_pos, *[x for s in state.blocks for x in s]]]

    with torch.no_grad():
        _, decoded = model(torch.tensor([[3]]), state=model(torch.tensor([[2, 5]]))[1])
        for n in (1, 4, 7, 40):
            _, st = model(torch.randint(0, CFG.vocab_size, (1, n)))
            assert strides(st) == strides(decoded), n
            for t in [st.next_pos, *[x for s in st.blocks for x in s]]:
                expect = [1]
                for size in reversed(t.shape[1:]):
                    expect.insert(0, expect[0] * size)
                assert list(t.stride()) == expect, (n, t.shape, t.stride())


def test_linear_one_row_takes_the_kernel_measured_faster(monkeypatch):
    """`model.linear` on CPU ("tuned"): one row goes through whichever kernel measured
    faster for the weight's dtype and shape (measured once, then cached), with
    F.linear's result to rounding (tests/ops/test_native.py covers row buckets)."""
    from rgemma import ops

    lin = importlib.import_module("rgemma.ops.linear")  # the module (ops.linear: the op)
    monkeypatch.setattr(lin, "_CHOICES", {})
    measured = []

    def fake_measure(weight, rows):  # torch.mv "wins" for 48 outputs, F.linear for 40
        measured.append(tuple(weight.shape))
        kernel = "mv" if weight.shape[0] == 48 else "linear"
        return lin.KernelChoice(kernel, {"linear": 2e-6, "mv": 1e-6})

    monkeypatch.setattr(lin, "measure_linear", fake_measure)
    calls = []
    real_mv = torch.mv
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append(1) or real_mv(*a))
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    b = torch.randn(48, dtype=torch.bfloat16)
    x1 = torch.randn(1, 1, 32, dtype=torch.bfloat16)
    for _ in range(3):
        got = model_mod.linear(x1, w, b)
    assert calls and got.shape == (1, 1, 48) and measured == [(48, 32)]  # measured once
    torch.testing.assert_close(
        got.float(), torch.nn.functional.linear(x1, w, b).float(), rtol=2e-2, atol=2e-2
    )
    calls.clear()
    w40 = torch.randn(40, 32, dtype=torch.bfloat16)
    assert torch.equal(model_mod.linear(x1, w40), torch.nn.functional.linear(x1, w40))
    assert not calls and measured == [(48, 32), (40, 32)]
    why = ops.describe(why=True)
    assert why["linear"] == "tuned (auto)"
    (mv,) = [v for k, v in why.items() if k.startswith("linear, 1 row, bfloat16 (48, 32), ")]
    assert mv == "torch.mv (F.linear 2 us, torch.mv 1 us)"


def test_gemv_measurement_is_never_slower_than_f_linear():
    """`measure_linear` times the kernels on the weight itself; another kernel is
    chosen only when it beats F.linear by the margin."""
    lin = importlib.import_module("rgemma.ops.linear")
    from rgemma.ops import native

    choice = lin.measure_linear(torch.randn(256, 128, dtype=torch.bfloat16), samples=2)
    assert set(choice.seconds) == {"linear", "mv"} | ({"native"} if native.available() else set())
    assert choice.kernel == lin.choose(choice.seconds, "linear")
    assert lin.choose({"linear": 1.0, "mv": 0.96, "native": 0.97}, "linear") == "linear"
    assert lin.choose({"linear": 1.0, "mv": 0.96, "native": 0.5}, "linear") == "native"


# ---------------------------------------------------------------------------------
# The attention window as a ring buffer
# ---------------------------------------------------------------------------------
def _attention_states(state):
    return [s for s in state.blocks if isinstance(s, model_mod.AttentionState)]


def test_donated_decode_steps_write_the_window_in_place_and_equal_full_forward():
    """Decode steps with `donate=True` across a document start and left padding give
    the logits and the state of one full pass, writing the window in place (the same
    storage every step); without `donate` the input state is left as it was."""
    model = _model()
    w = CFG.attention_window_size
    tokens = torch.randint(0, CFG.vocab_size, (2, 30))
    pos = torch.cat([torch.arange(17), torch.arange(13)])[None].repeat(2, 1)
    pos[1, :4] = -1  # row 1: left padding, then one document
    pos[1, 4:] = torch.arange(26)
    with torch.no_grad():
        full, full_state = model(tokens, pos)
        out, state = model(tokens[:, :6], pos[:, :6])
        outs, ptrs = [out], set()
        for t in range(6, 30):
            before = [x.clone() for s in state.blocks for x in s]
            kept, _ = model(tokens[:, t : t + 1], pos[:, t : t + 1], state)  # no donate
            assert all(
                torch.equal(a, b) for a, b in zip(before, [x for s in state.blocks for x in s])
            )
            out, state = model(tokens[:, t : t + 1], pos[:, t : t + 1], state, donate=True)
            torch.testing.assert_close(out, kept, rtol=0, atol=0)
            ptrs.add(tuple(s.keys.data_ptr() for s in _attention_states(state)))
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)
    assert len(ptrs) == 1  # written in place from the first donated step on
    for got, want in zip(_attention_states(state), _attention_states(full_state)):
        assert torch.equal(got.positions, want.positions)
        for p in range(13 - w, 13):  # row 0: the second document's last w positions
            assert got.positions[0, p % w] == p
        for p in range(26 - w, 26):  # row 1: its document's, each in slot p % w
            assert got.positions[1, p % w] == p
        seen = got.positions >= 0
        torch.testing.assert_close(got.keys[seen], want.keys[seen], **TOL)


def test_donated_expanded_state_is_copied_not_written_through():
    """A state of `expand`ed rows (views sharing one row) is copied before a donated
    step writes to it, so each row keeps its own window."""
    model = _model()
    with torch.no_grad():
        _, one = model(torch.randint(0, CFG.vocab_size, (1, 11)))
        snapshot = [x.clone() for s in one.blocks for x in s]
        nxt = torch.randint(0, CFG.vocab_size, (3,))
        got, _ = model.decode_step(nxt, one.expand(3), donate=True)
        want = torch.cat([model.decode_step(nxt[i : i + 1], one)[0] for i in range(3)])
    torch.testing.assert_close(got, want, **TOL)
    assert all(torch.equal(a, b) for a, b in zip(snapshot, [x for s in one.blocks for x in s]))


def test_fresh_prefill_skips_the_empty_window(monkeypatch):
    """From an empty state the first query chunk attends over its own keys only; from
    a state with keys, over the window plus the chunk."""
    model = _model()
    sizes = []
    real = model_mod.local_attention

    def spy(q, k, *args, **kwargs):
        sizes.append(k.shape[1])
        return real(q, k, *args, **kwargs)

    monkeypatch.setattr(model_mod, "local_attention", spy)
    tokens = torch.randint(0, CFG.vocab_size, (1, 12))
    with torch.no_grad():
        _, state = model(tokens[:, :5])
        model(tokens[:, 5:], state=state)
    n_attn = len(_attention_states(state))
    assert sizes == [5] * n_attn + [CFG.attention_window_size + 7] * n_attn


def test_state_saved_in_the_earlier_layout_loads_as_a_ring(tmp_path):
    """A state file from before the ring buffer (keys oldest first, no "layout" in its
    metadata) is converted on load and continues exactly."""
    from safetensors.torch import save_file

    model = _model()
    w = CFG.attention_window_size
    tokens = torch.randint(0, CFG.vocab_size, (1, 23))
    with torch.no_grad():
        full, _ = model(tokens)
        _, state = model(tokens[:, :17])
    tensors = {"next_pos": state.next_pos}
    for i, s in enumerate(state.blocks):
        if isinstance(s, model_mod.AttentionState):  # back to oldest first: positions 9..16
            order = torch.argsort(s.positions, dim=1)
            s = type(s)(
                *(x.gather(1, order if x.ndim == 2 else order[..., None].expand_as(x)) for x in s)
            )
            assert s.positions[0].tolist() == list(range(17 - w, 17))
        for name, x in zip(s._fields, s):
            tensors[f"blocks.{i}.{name}"] = x.contiguous()
    save_file(
        tensors, tmp_path / "old.safetensors", {"format": "rgemma-state", "config": CFG.to_json()}
    )
    loaded = load_state(tmp_path / "old.safetensors", CFG)
    for got, want in zip(_attention_states(loaded), _attention_states(state)):
        assert torch.equal(got.positions, want.positions) and torch.equal(got.keys, want.keys)
    with torch.no_grad():
        out, _ = model(tokens[:, 17:], state=loaded)
    torch.testing.assert_close(out, full[:, 17:], **TOL)


# ----------------------------------------------------------------------------------
# Padding on either side (segment_pos -1): invisible to the real tokens and the state
# ----------------------------------------------------------------------------------
def _padded(rows, layout):
    """Rows of (tokens, segment_pos) in one batch: `layout[i]` = (left, right) padding
    of row i. Returns tokens, segment_pos (b, T) and each row's real slice."""
    T = max(left + len(tok) + right for (tok, _), (left, right) in zip(rows, layout))
    tokens = torch.zeros(len(rows), T, dtype=torch.long)  # pad id 0
    pos = torch.full((len(rows), T), -1)
    real = []
    for i, ((tok, p), (left, _)) in enumerate(zip(rows, layout)):
        n = len(tok)
        tokens[i, left : left + n], pos[i, left : left + n] = tok, p
        real.append(slice(left, left + n))
    return tokens, pos, real


def _assert_states_equal(got, want):
    """Every tensor of two states of the same batch size, attention slots included."""
    torch.testing.assert_close(got.next_pos, want.next_pos, rtol=0, atol=0)
    for g, w in zip(got.blocks, want.blocks):
        assert type(g) is type(w)
        for a, b in zip(g, w):
            torch.testing.assert_close(a.float(), b.float(), **TOL)


@pytest.mark.parametrize("cfg", [CFG, CFG_ODD], ids=["tiny", "odd"])
def test_right_padded_equals_left_padded_equals_alone(cfg):
    """A batch of 3 (one row of full length, rows of different lengths, a document
    reset inside a row) padded on the right, on the left, and on both sides: the
    logits at real tokens, the final state and a continuation from it (a chunk, then
    decode steps) equal each row run alone."""
    model = _model(cfg)
    g = torch.Generator().manual_seed(3)
    lengths = [23, 6, 17]  # row 2: two documents, 9 + 8 tokens
    positions = [torch.arange(23), torch.arange(6), torch.cat([torch.arange(9), torch.arange(8)])]
    rows = [
        (torch.randint(0, cfg.vocab_size, (n,), generator=g), p) for n, p in zip(lengths, positions)
    ]
    nxt = torch.randint(0, cfg.vocab_size, (3, 7), generator=g)  # the continuation
    with torch.no_grad():
        alone = [model(tok[None], p[None]) for tok, p in rows]
        alone_next = [model(nxt[i : i + 1], state=s)[0] for i, (_, s) in enumerate(alone)]
        layouts = {
            "right": [(0, 0), (0, 17), (0, 6)],
            "left": [(0, 0), (17, 0), (6, 0)],
            "both": [(2, 1), (10, 10), (0, 9)],  # padding on each side of a row
        }
        for name, layout in layouts.items():
            tokens, pos, real = _padded(rows, layout)
            out, state = model(tokens, pos)
            for i, sl in enumerate(real):
                torch.testing.assert_close(out[i, sl], alone[i][0][0], **TOL, msg=name)
            _assert_states_equal(state, concat_states([s for _, s in alone]))
            # Continue: a chunk of 4, then decode steps, from the padded batch's state.
            outs, st = [], state
            out, st = model(nxt[:, :4], state=st)
            outs.append(out)
            for t in range(4, 7):
                out, st = model(nxt[:, t : t + 1], state=st, donate=True)
                outs.append(out)
            torch.testing.assert_close(torch.cat(outs, 1), torch.cat(alone_next), **TOL)


def test_padding_between_tokens_and_after_a_state_is_skipped():
    """Padding anywhere (between tokens, in decode steps, as a whole chunk) and left
    padding on a row that continues a state (no document start after it) leave the
    result of the row without its padding; a row of padding only keeps its state."""
    model = _model()
    tokens = torch.randint(0, CFG.vocab_size, (2, 40))
    with torch.no_grad():
        full, full_state = model(tokens)
        _, state = model(tokens[:, :15])
        # Row 0 gets 3 padding tokens before its next 10, row 1 after them.
        x = torch.zeros(2, 13, dtype=torch.long)
        pos = torch.full((2, 13), -1)
        x[0, 3:], pos[0, 3:] = tokens[0, 15:25], torch.arange(15, 25)
        x[1, :10], pos[1, :10] = tokens[1, 15:25], torch.arange(15, 25)
        out, state = model(x, pos, state)
        torch.testing.assert_close(out[0, 3:], full[0, 15:25], **TOL)
        torch.testing.assert_close(out[1, :10], full[1, 15:25], **TOL)
        # A chunk of padding only, and a decode step padded in one row.
        _, same = model(torch.zeros(2, 5, dtype=torch.long), torch.full((2, 5), -1), state)
        _assert_states_equal(same, state)
        out, state = model(tokens[:, 25:26], torch.tensor([[25], [-1]]), state)
        out, state = model(tokens[1:2, 25:26].expand(2, 1), torch.tensor([[-1], [25]]), state)
        # Interior padding in both rows, then the rest.
        x = torch.zeros(2, 18, dtype=torch.long)
        pos = torch.full((2, 18), -1)
        x[:, [0, 1, 4, 5, 6]], pos[:, [0, 1, 4, 5, 6]] = tokens[:, 26:31], torch.arange(26, 31)
        x[:, 9:], pos[:, 9:] = tokens[:, 31:40], torch.arange(31, 40)
        out, state = model(x, pos, state)
        torch.testing.assert_close(out[:, 9:], full[:, 31:40], **TOL)
        torch.testing.assert_close(out[:, [0, 1, 4, 5, 6]], full[:, 26:31], **TOL)
    _assert_states_equal(state, full_state)


def test_padded_training_step_has_the_gradients_of_the_unpadded_row():
    """Gradients flow through real tokens only: a right-padded row's loss has the
    gradients of the row alone (padding contributes nothing)."""
    model = _model()
    tokens = torch.randint(0, CFG.vocab_size, (1, 12))
    padded = torch.cat([tokens, torch.zeros(1, 5, dtype=torch.long)], 1)
    pos = torch.cat([torch.arange(12), torch.full((5,), -1)])[None]
    grads = []
    for x, p in [(tokens, None), (padded, pos)]:
        model.zero_grad()
        out, _ = model(x, p)
        out[:, :12].logsumexp(-1).sum().backward()
        grads.append({n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)
