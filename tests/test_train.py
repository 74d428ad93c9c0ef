"""Training: optimiser groups, loss, exact resume, atomic checkpoints, packing
isolation, loss masking, config loading and input errors. Tiny models, seconds each."""

from __future__ import annotations

import importlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle import random_model

from rgemma.config import GriffinConfig, config_diff
from rgemma.errors import ConfigError, InputError
from rgemma.model import Griffin
from rgemma.training import (
    TrainConfig,
    apply_overrides,
    find_checkpoints,
    lr_at,
    masked_loss,
    param_groups,
    train,
)
from rgemma.training.distributed import Dist

# The training module (`rgemma.train` is its `train` function).
train_mod = importlib.import_module("rgemma.training")
TOKENIZER = Path(train_mod.__file__).parent.parent / "assets" / "bundled" / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="bundled tokenizer missing")

TINY_MODEL = {"preset": "test-tiny", "vocab_size": 4096}
WORDS = (  # noqa: SIM905
    "the a cat dog sat on mat and ran far away while birds sang in "
    "trees near old houses by quiet river where children played every summer day until evening came"
).split()


def _text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
        if rng.random() < 0.2:
            lines.append("")
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus(tmp_path: Path) -> dict[str, Path]:
    train_file = tmp_path / "train.txt"
    train_file.write_text(_text(0, 3000), encoding="utf-8")
    val_file = tmp_path / "val.txt"
    val_file.write_text(_text(1, 600), encoding="utf-8")
    return {"train": train_file, "val": val_file}


def _cfg(tmp_path: Path, corpus: dict[str, Path], name: str = "run", **kw) -> TrainConfig:
    base = {
        "model": TINY_MODEL,
        "tokenizer": str(TOKENIZER),
        "train_data": [str(corpus["train"])],
        "val_data": [str(corpus["val"])],
        "doc_chars": 600,
        "seq_len": 32,
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 2,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "save_every": 3,
        "eval_every": 3,
        "eval_batches": 2,
        "log_every": 1,
        "out_dir": str(tmp_path / name),
        "progress": False,
        "save_final": False,
    }
    base.update(kw)
    return TrainConfig(**base)


class _Crash(Exception):
    """Stands for a kill of the process."""


# ----------------------------------------------------------------------------------
def test_param_groups_exclude_norms_biases_embedding_a_param():
    model = Griffin(GriffinConfig.preset("test-tiny"))
    decayed, undecayed = param_groups(model, 0.1)
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    no_decay = set(undecayed["names"])
    names = dict(model.named_parameters())
    assert set(decayed["names"]) | no_decay == set(names)
    assert not set(decayed["names"]) & no_decay
    for name in names:
        expect = (
            name.endswith((".scale", ".bias", ".b", "a_param"))
            or name == "embedder.input_embedding"
        )
        assert (name in no_decay) == expect, name
    # Every kind is present on both sides.
    assert "embedder.input_embedding" in no_decay
    assert "final_norm.scale" in no_decay
    assert "blocks.0.recurrent_block.rg_lru.a_param" in no_decay
    assert "blocks.0.recurrent_block.conv_1d.b" in no_decay
    assert "blocks.0.mlp_block.ffw_up.gate_proj.bias" in no_decay
    assert "blocks.2.attention_block.proj_final.bias" in no_decay
    assert "blocks.0.mlp_block.ffw_up.up_proj.weight" in decayed["names"]
    assert "blocks.2.attention_block.proj_q.weight" in decayed["names"]
    assert "blocks.0.recurrent_block.rg_lru.a_gate.w" in decayed["names"]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(model="test-tiny", lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [lr_at(s, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cfg) == pytest.approx(1.0)
    assert lr_at(9, cfg) == pytest.approx(0.55)
    assert lr_at(14, cfg) == pytest.approx(0.1)
    assert lr_at(100, cfg) == pytest.approx(0.1)


def test_masked_loss_is_mean_over_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 0, 1], [1, 0, 0, 0, 1]], dtype=torch.float32)
    total, count = masked_loss(logits, targets, mask)
    sel = mask.bool()
    expect = torch.nn.functional.cross_entropy(logits[sel], targets[sel], reduction="sum")
    assert count.item() == 5
    torch.testing.assert_close(total, expect)


def test_loss_decreases_on_repeated_batch(tmp_path):
    # One batch per epoch: every step sees the same four sequences.
    text = tmp_path / "one.txt"
    text.write_text(_text(5, 60), encoding="utf-8")
    cfg = TrainConfig(
        model=TINY_MODEL,
        tokenizer=str(TOKENIZER),
        train_data=[str(text)],
        val_fraction=0.0,
        seq_len=16,
        batch_size=4,
        max_steps=12,
        warmup_steps=0,
        lr=1e-2,
        min_lr=1e-2,
        log_every=1,
        save_every=0,
        eval_every=0,
        out_dir=str(tmp_path / "run"),
        progress=False,
        save_final=False,
        weight_decay=0.0,
    )
    result = train(cfg)
    losses = [v for _, v in result["losses"]]
    assert len(losses) == 12
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(math.isfinite(v) for v in losses)


def test_resume_equals_uninterrupted(tmp_path, corpus, monkeypatch):
    full = train(_cfg(tmp_path, corpus, "full"))
    assert [s for s, _ in full["losses"]] == [1, 2, 3, 4, 5, 6]
    assert full["val_loss"] is not None and full["val_bpb"] > 0
    assert math.isclose(full["val_ppl"], math.exp(full["val_loss"]))

    real_save = train_mod.save_checkpoint

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise _Crash

    monkeypatch.setattr(
        importlib.import_module("rgemma.training.loop"), "save_checkpoint", save_then_die
    )
    with pytest.raises(_Crash):
        train(_cfg(tmp_path, corpus, "split"))
    monkeypatch.undo()
    assert [s for s, _ in find_checkpoints(tmp_path / "split")] == [3]
    # Python, numpy and torch RNGs are restored too (not only the data position).
    random.seed(123), np.random.seed(123), torch.manual_seed(123)

    resumed = train(_cfg(tmp_path, corpus, "split", resume=True))
    assert resumed["losses"] == full["losses"][3:]  # bitwise
    assert resumed["val_loss"] == full["val_loss"]
    a = train_mod.read_checkpoint_state(full["checkpoint"])
    b = train_mod.read_checkpoint_state(resumed["checkpoint"])
    for group in ("model", "optim"):  # parameters and AdamW moments, bitwise
        assert a[group].keys() == b[group].keys()
        for k, v in a[group].items():
            assert torch.equal(v, b[group][k]) if isinstance(v, torch.Tensor) else v == b[group][k]
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(x)["step"] for x in lines if json.loads(x)["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, corpus, monkeypatch, capsys):
    cfg = _cfg(tmp_path, corpus, "run", max_steps=9, eval_every=0)
    reference = train(_cfg(tmp_path, corpus, "ref", max_steps=9, eval_every=0))

    real_torch_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        # The 2nd checkpoint (step 6) dies after its model and optimizer are written.
        if str(f).endswith("trainer_state.pt"):
            calls["n"] += 1
            if calls["n"] == 2:
                raise _Crash
        return real_torch_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(_Crash):
        train(cfg)
    monkeypatch.undo()
    ckpt_root = tmp_path / "run" / "checkpoints"
    assert [s for s, _ in find_checkpoints(tmp_path / "run")] == [3]
    assert not [p for p in ckpt_root.iterdir() if p.name.startswith(".tmp-")]
    assert (ckpt_root / "latest").read_text().strip() == "step_0000003"

    # A SIGKILL mid-write leaves a temp dir; a torn step dir lacks files: both ignored.
    partial = ckpt_root / ".tmp-step_0000006.abc123"
    (partial / "model").mkdir(parents=True)
    (partial / "model" / "model.safetensors").write_bytes(b"\0" * 10)
    torn = ckpt_root / "step_0000006"
    torn.mkdir()
    (torn / "optimizer.pt").write_bytes(b"garbage")

    capsys.readouterr()
    resumed = train(cfg.replace(resume=True))
    err = capsys.readouterr().err
    assert f"rgemma: warning: checkpoint {torn} is incomplete or truncated" in err
    assert "resuming from step_0000003" in err
    assert not partial.exists()
    assert resumed["losses"] == reference["losses"][3:]
    assert [s for s, _ in find_checkpoints(tmp_path / "run")] == [3, 6, 9]


def test_checkpoints_keep_last_and_final_model_loads(tmp_path, corpus):
    from rgemma.checkpoint import load_model

    cfg = _cfg(
        tmp_path, corpus, max_steps=4, save_every=1, eval_every=0, keep_last=2, save_final=True
    )
    result = train(cfg)
    assert [s for s, _ in find_checkpoints(cfg.out_dir)] == [3, 4]
    final = Path(result["final_dir"])
    assert (final / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    model = load_model(final)
    assert model.config == train_mod.model_config_from(TINY_MODEL)
    ckpt_model = load_model(result["checkpoint"])  # a training checkpoint loads too
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt_model.named_parameters()):
        assert torch.equal(p, q), n
    # A fresh start into a directory with checkpoints is refused.
    with pytest.raises(ConfigError, match="resume"):
        train(cfg)


def test_fine_tune_from_checkpoint_with_bf16_and_grad_checkpointing(tmp_path, corpus):
    base = train(_cfg(tmp_path, corpus, "base", max_steps=2, eval_every=0, save_final=True))
    tuned = train(
        _cfg(
            tmp_path,
            corpus,
            "tuned",
            model=None,
            init_from=base["final_dir"],
            tokenizer=None,
            max_steps=2,
            eval_every=0,
            bf16=True,
            gradient_checkpointing=True,
        )
    )
    assert tuned["step"] == 2 and all(math.isfinite(v) for _, v in tuned["losses"])


def test_nan_loss_stops_without_checkpoint(tmp_path, corpus, monkeypatch):
    from rgemma.training.objective import LMObjective

    real = LMObjective.forward

    def nan_forward(self, *args, **kwargs):  # the training step's loss turns NaN
        total, state = real(self, *args, **kwargs)
        return total * float("nan"), state

    monkeypatch.setattr(LMObjective, "forward", nan_forward)
    with pytest.raises(train_mod.TrainingDiverged, match="not finite at step 1"):
        train(_cfg(tmp_path, corpus, max_steps=3))
    assert find_checkpoints(tmp_path / "run") == []


def test_evaluate_scores_validation_documents_whole():
    from rgemma.data import PackedDataset, TokenizedDocument

    cfg = GriffinConfig.preset("test-tiny")  # window 8, shorter than the documents
    model = random_model(cfg, std=0.2).train()
    g = torch.Generator().manual_seed(2)
    docs = []
    for n, first_learned in ((20, 1), (35, 10), (9, 1)):  # the 2nd: a completion from 10 on
        tokens = torch.randint(3, cfg.vocab_size, (n,), generator=g).numpy().astype(np.int32)
        docs.append(TokenizedDocument(tokens, np.arange(n) >= first_learned))

    def direct(doc: TokenizedDocument, upto: int) -> tuple[float, int]:
        """Summed masked cross-entropy of one full forward over doc.tokens[:upto]."""
        ids = torch.from_numpy(doc.tokens[:upto]).long()
        with torch.no_grad():
            logits, _ = model(ids[None])
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[1:], reduction="none")
        keep = torch.from_numpy(doc.trainable[1:upto])
        return float(nll[keep].double().sum()), int(keep.sum())

    parts = [direct(d, len(d.tokens)) for d in docs]
    total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert count == 19 + 25 + 8
    byte_lengths = torch.full((cfg.vocab_size,), 3.0, dtype=torch.float64)
    got = train_mod.evaluate(model, docs, chunk_size=8, batch_size=2, byte_lengths=byte_lengths)
    assert model.training  # restored
    assert got["val_tokens"] == count
    assert got["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["val_ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert got["val_bpb"] == pytest.approx(total / math.log(2) / (3 * count), rel=1e-5)
    # A packed validation set is scored by its documents, not by its packed rows.
    packed = PackedDataset(docs, seq_len=16, batch_size=2, shuffle=False, drop_last=False)
    assert train_mod.evaluate(model, packed, chunk_size=5)["val_loss"] == pytest.approx(
        got["val_loss"], rel=1e-5
    )
    # A budget of 30 predicted positions: all of the 1st document (19), 11 of the 2nd.
    cut = train_mod.evaluate(model, docs, max_tokens=30, chunk_size=4)
    head = [parts[0], direct(docs[1], 12)]
    assert cut["val_tokens"] == 19 + 2 == sum(p[1] for p in head)
    assert cut["val_loss"] == pytest.approx(sum(p[0] for p in head) / 21, rel=1e-5)
    assert "val_bpb" not in cut


def test_packed_documents_do_not_see_each_other():
    from rgemma.data import PackedDataset, TokenizedDocument

    cfg = GriffinConfig.preset("test-tiny")  # window 8, shorter than the documents
    model = random_model(cfg, std=0.2)
    g = torch.Generator().manual_seed(1)
    doc_a = torch.randint(3, cfg.vocab_size, (13,), generator=g).numpy().astype(np.int32)
    doc_b = torch.randint(3, cfg.vocab_size, (20,), generator=g).numpy().astype(np.int32)
    docs = [TokenizedDocument(d, np.ones(len(d), bool)) for d in (doc_a, doc_b)]
    ds = PackedDataset(docs, seq_len=33, batch_size=1, shuffle=False)
    batch = ds.batch(0)
    assert batch.tokens[0].tolist() == doc_a.tolist() + doc_b.tolist()
    assert batch.segment_pos[0].tolist() == list(range(13)) + list(range(20))
    # The last token of A does not learn to predict B's first token.
    assert batch.loss_mask[0, 12] == 0 and batch.loss_mask[0, :12].all()

    with torch.no_grad():
        packed, _ = model(batch.tokens, batch.segment_pos)
        alone_a, _ = model(torch.from_numpy(doc_a).long()[None])
        alone_b, _ = model(torch.from_numpy(doc_b).long()[None])
    torch.testing.assert_close(packed[:, :13], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 13:], alone_b, rtol=1e-5, atol=1e-5)
    # Gradients: B's loss does not reach the positions of A.
    emb = model.embedder.encode(batch.tokens).detach().requires_grad_(True)
    x = emb
    for block, state in zip(model.blocks, model.init_state(1).blocks):
        x, _ = block(x, batch.segment_pos, state)
    x[:, 13:].sum().backward()
    assert emb.grad[:, :13].abs().max() == 0
    assert emb.grad[:, 13:].abs().max() > 0


def test_prompt_completion_loss_mask(tmp_path):
    from rgemma.tokenizer import Tokenizer

    jsonl = tmp_path / "ft.jsonl"
    rows = [
        {"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer:", "completion": f" {2 * i}."}
        for i in range(40)
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = TrainConfig(
        model=TINY_MODEL,
        tokenizer=str(TOKENIZER),
        train_data=[str(jsonl)],
        val_fraction=0.0,
        seq_len=64,
        batch_size=2,
        max_steps=2,
        warmup_steps=0,
        log_every=1,
        save_every=0,
        eval_every=0,
        out_dir=str(tmp_path / "run"),
        progress=False,
        save_final=False,
    )
    tok = Tokenizer(TOKENIZER)
    one_process = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loop = importlib.import_module("rgemma.training.loop")
    train_set, val_set = loop._build_data(cfg, tok, one_process, 1)
    assert val_set is None
    batch = train_set.batch(0)
    for row in range(batch.tokens.shape[0]):
        mask = batch.loss_mask[row].bool()
        learned = batch.targets[row][mask].tolist()
        # Only completions (and their EOS) are learned; every document boundary is cut.
        pieces = tok.decode([t for t in learned if t != tok.eos_id])
        assert "Question" not in pieces and "Answer" not in pieces
        assert learned.count(tok.eos_id) >= 1
        assert all(c.isdigit() or c in " ." for c in pieces), pieces
        assert mask.sum() < 0.4 * mask.numel()
    result = train(cfg)
    assert result["step"] == 2 and all(math.isfinite(v) for _, v in result["losses"])


# ----------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "empty"),
        (b"  \n\n ", "empty"),
        (b"caf\xe9 au lait\n", "not UTF-8"),
    ],
)
def test_bad_text_files(tmp_path, corpus, content, match):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        train(_cfg(tmp_path, corpus, train_data=[str(corpus["train"]), str(bad)]))
    assert "bad.txt" in str(err.value)


@pytest.mark.parametrize(
    "line3, match",
    [
        ('{"prompt": "hi"}', r"ft\.jsonl:3: field 'completion'"),
        ('{"completion": "hi"}', r"ft\.jsonl:3: field 'prompt'"),
        ('{"other": 1}', r"ft\.jsonl:3: expected a 'text'"),
        ('{"text": ', r"ft\.jsonl:3: invalid JSON"),
        ('{"messages": [{"role": "user"}]}', r"ft\.jsonl:3: .*content"),
    ],
)
def test_bad_jsonl_names_the_line(tmp_path, corpus, line3, match):
    jsonl = tmp_path / "ft.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b"})
    jsonl.write_text(f"{good}\n{good}\n{line3}\n{good}\n", encoding="utf-8")
    with pytest.raises(InputError, match=match):
        train(_cfg(tmp_path, corpus, train_data=[str(jsonl)]))


def test_missing_data_path_and_empty_glob(tmp_path, corpus):
    with pytest.raises(InputError, match="not found"):
        train(_cfg(tmp_path, corpus, train_data=[str(tmp_path / "nope.txt")]))
    with pytest.raises(InputError, match="matches no file"):
        train(_cfg(tmp_path, corpus, train_data=[str(tmp_path / "*.md")]))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"seq_len": 1}, "seq_len"),
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": -8}, "seq_len"),
        ({"seq_len": 2.5}, "seq_len"),
        ({"seq_len": "64"}, "seq_len"),
        ({"seq_len": 128, "max_seq_len": 64}, "exceeds max_seq_len"),
        ({"batch_size": 0}, "batch_size"),
        ({"grad_accum": 0}, "grad_accum"),
        ({"lr": -1.0}, "lr"),
        ({"bf16": "yes"}, "bf16"),
        ({"model": None}, "model"),
        ({"model": "no-such-preset"}, "unknown preset"),
    ],
)
def test_invalid_config_values(tmp_path, corpus, changes, match):
    with pytest.raises(ConfigError, match=match):
        train(_cfg(tmp_path, corpus, **changes))


def test_resume_with_different_model_config_names_fields(tmp_path, corpus):
    train(_cfg(tmp_path, corpus, max_steps=3, eval_every=0))
    other = dict(TINY_MODEL, width=64, mlp_expanded_width=64)
    with pytest.raises(ConfigError, match="width") as err:
        train(_cfg(tmp_path, corpus, max_steps=6, resume=True, model=other))
    msg = str(err.value)
    assert "mlp_expanded_width" in msg and "32" in msg and "64" in msg
    assert "lru_width" not in msg


def test_config_files_and_overrides(tmp_path):
    data = {"model": "test-tiny", "train_data": ["a.txt"], "seq_len": 64, "lr": 1e-3}
    (tmp_path / "c.json").write_text(json.dumps(data))
    cfg = TrainConfig.from_file(
        tmp_path / "c.json", ["lr=3e-4", "bf16=true", "model.width=64", "out_dir=runs/x"]
    )
    assert cfg.lr == 3e-4 and cfg.bf16 is True and cfg.out_dir == "runs/x"
    assert cfg.model == {"preset": "test-tiny", "width": 64}
    assert train_mod.model_config_from(cfg.model).width == 64

    (tmp_path / "c.toml").write_text(
        'train_data = ["a.txt"]\nseq_len = 64\n[model]\npreset = "test-tiny"\nnum_layers = 4\n'
    )
    cfg = TrainConfig.from_file(tmp_path / "c.toml")
    assert train_mod.model_config_from(cfg.model).num_layers == 4

    (tmp_path / "bad.json").write_text('{"seq_len": 64, "sequence_length": 3, "model": "x"}')
    with pytest.raises(ConfigError, match="sequence_length"):
        TrainConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text('{"seq_len": 64,')
    with pytest.raises(ConfigError, match="broken.json: invalid JSON at line 1"):
        TrainConfig.from_file(tmp_path / "broken.json")
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["lr"])
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


# ----------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------
def test_cli_train_then_resume(tmp_path, corpus, capsys):
    from rgemma.cli import main

    cfg = _cfg(tmp_path, corpus, max_steps=4, save_every=2, eval_every=0).to_dict()
    cfg.pop("out_dir")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "cli-run"
    argv = ["train", "--config", str(path), "--out", str(out), "--no-progress"]
    assert main(argv + ["--max-steps", "2", "lr=0.002"]) == 0
    assert "steps:       2" in capsys.readouterr().err
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["lr"] == 0.002 and saved["max_steps"] == 2 and saved["out_dir"] == str(out)
    assert main(["train", "--set", "lr=0.002", *argv[1:], "--max-steps", "3", "--resume"]) == 0
    assert [s for s, _ in find_checkpoints(out)] == [2, 3]
    # Errors are one line with exit code 2.
    assert main(argv + ["seq_len=1"]) == 2
    err = capsys.readouterr().err
    assert "rgemma: error:" in err and "seq_len" in err and "Traceback" not in err
    assert main(argv + ["no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


def _fake_train(monkeypatch) -> list:
    seen = []

    def fake(cfg):
        seen.append(cfg)
        keys = ("train_loss", "val_loss", "tokens_per_s", "checkpoint", "final_dir")
        return {"step": 0, "tokens_seen": 0, **dict.fromkeys(keys)}

    monkeypatch.setattr(train_mod, "train", fake)
    return seen


def test_cli_train_overrides_anywhere_and_blame(tmp_path, monkeypatch, capsys):
    from rgemma.cli import main

    seen = _fake_train(monkeypatch)
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": "test-tiny", "train_data": ["a.txt"], "out_dir": "o"}))
    argv = ["train", "--config", str(path), "--no-progress", "lr=0.01", "--out", "X", "seed=3"]
    assert main(argv + ["--set", "bf16=true", "log_every=5"]) == 0
    cfg = seen[-1]
    assert (cfg.lr, cfg.seed, cfg.bf16, cfg.log_every, cfg.out_dir) == (0.01, 3, True, 5, "X")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path), "lr=1", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    # An override's error is blamed on the override, not on the config file.
    assert main(["train", "--config", str(path), "--out", "X", "seq_len=0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rgemma: error: override seq_len=0: TrainConfig.seq_len"), err
    assert main(["train", "--config", str(path), "--max-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rgemma: error: --max-steps 5: TrainConfig.warmup_steps (100)"), err
    path.write_text(json.dumps({"model": "test-tiny", "train_data": ["a.txt"], "seq_len": 0}))
    assert main(["train", "--config", str(path), "--out", "X"]) == 2
    assert capsys.readouterr().err.startswith(f"rgemma: error: {path}: TrainConfig.seq_len")


def test_warmup_longer_than_max_steps_is_rejected():
    with pytest.raises(
        ConfigError, match=r"warmup_steps \(10\) exceeds TrainConfig.max_steps \(5\)"
    ):
        TrainConfig(model="test-tiny", warmup_steps=10, max_steps=5)


def test_config_diff_prints_plain_values():
    a = GriffinConfig.preset("test-tiny")
    b = GriffinConfig.from_dict(dict(a.to_dict(), block_types=["attention"] * len(a.block_types)))
    (diff,) = config_diff(a, b)
    assert "BlockType" not in diff and "'recurrent'" in diff and "'attention'" in diff


def test_resume_without_checkpoint_says_so_and_no_bar_off_tty(tmp_path, corpus, capsys):
    cfg = _cfg(tmp_path, corpus, max_steps=1, warmup_steps=0, eval_every=0, save_every=0)
    train(cfg.replace(resume=True, progress=True))
    err = capsys.readouterr().err
    assert f"rgemma: warning: no checkpoint in {cfg.out_dir}: starting from scratch" in err
    assert "%|" not in err and "step/s" not in err  # stderr is not a TTY: no bar


def test_cli_train_tokenizer(tmp_path, capsys):
    from rgemma.cli import main
    from rgemma.tokenizer import Tokenizer

    src = tmp_path / "text"
    src.mkdir()
    (src / "a.txt").write_text(_text(3, 2000), encoding="utf-8")
    out = tmp_path / "tok.model"
    argv = [
        "train-tokenizer",
        "--input",
        str(src),
        "--vocab-size",
        "400",
        "--output",
        str(out),
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    tok = Tokenizer(out)
    assert tok.vocab_size == 400 and tok.bos_id == 2
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    assert (
        main(
            [
                "train-tokenizer",
                "--input",
                str(tmp_path / "missing.txt"),
                "--vocab-size",
                "300",
                "--output",
                str(out),
            ]
        )
        == 2
    )
    assert "missing.txt" in capsys.readouterr().err
    base = ["train-tokenizer", "--input", str(src), "--vocab-size", "300"]
    assert main(base + ["--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--output {tmp_path} is a directory" in err and err.count("\n") == 1
    assert not Path(str(tmp_path) + ".model").exists()
    assert main(base + ["--output", str(out), "--threads", "0"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(InputError, match="is a directory"):
        from rgemma.tokenizer import train_tokenizer

        train_tokenizer([src / "a.txt"], tmp_path, 300)


def test_cli_lora_and_carry_state_flags_set_the_config(tmp_path, monkeypatch, capsys):
    from rgemma.cli import main

    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg: seen.append(cfg) or {})
    argv = ["train", "model=test-tiny", 'train_data=["a.txt"]', "--out", str(tmp_path)]
    assert main(argv) == 0
    assert (seen[-1].lora_rank, seen[-1].carry_state) == (0, False)
    flags = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-targets", "q_proj", "ffw_down"]
    assert main([*argv, *flags, "--carry-state"]) == 0
    cfg = seen[-1]
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.carry_state) == (4, 8.0, True)
    assert list(cfg.lora_targets) == ["q_proj", "ffw_down"]
    assert main([*argv, "--lora-rank", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--lora-rank -1" in err and "lora_rank" in err
