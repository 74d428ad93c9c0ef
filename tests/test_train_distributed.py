"""Training on several processes: `torchrun --nproc_per_node 2 -m rgemma train` (gloo,
CPU, tiny model) trains exactly like one process with the same global batch, under
FSDP2 (full and LoRA) and DDP; activation checkpointing changes nothing but memory;
the process-group plumbing and the batch layout reject bad input with one line,
reported by rank 0 only.

Two torchrun launches (a few seconds of startup each) run the three 2-process
trainings; the one-process references run in this process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from rgemma.config import GriffinConfig
from rgemma.data import Batch
from rgemma.errors import ConfigError, InputError
from rgemma.model import Griffin
from rgemma.training import TrainConfig, model_config_from, train
from rgemma.training.distributed import Dist, init_distributed, local_rows, read_env
from rgemma.training.objective import LMObjective
from rgemma.training.parallel import apply_activation_checkpointing

TOKENIZER = (
    Path(__file__).parent.parent / "src" / "rgemma" / "assets" / "bundled" / "tokenizer.model"
)
pytestmark = pytest.mark.skipif(
    not TOKENIZER.is_file() or not tdist.is_available() or not tdist.is_gloo_available(),
    reason="needs the bundled tokenizer and torch.distributed with gloo",
)

WORDS = (  # noqa: SIM905
    "the a cat dog sat on mat and ran far away while birds sang in trees near old houses "
    "by quiet river where children played every summer day until evening came"
).split()
STEPS = 4
ONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = [
        " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "."
        for _ in range(n_words // 12)
    ]
    return "\n".join(lines) + "\n"


def _config(root: Path, out: str, **changes) -> dict:
    """A run of STEPS steps on the tiny model: global batch 8 rows of 32 tokens, the
    final evaluation, the final model."""
    cfg = {
        "model": {"preset": "test-tiny", "vocab_size": 4096},
        "tokenizer": str(TOKENIZER),
        "train_data": [str(root / "train.txt")],
        "val_data": [str(root / "val.txt")],
        "doc_chars": 600,
        "seq_len": 32,
        "batch_size": 4,
        "grad_accum": 2,
        "max_steps": STEPS,
        "warmup_steps": 1,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "save_every": 0,
        "eval_every": 0,
        "eval_batches": 2,
        "log_every": 1,
        "num_threads": 1,
        "progress": False,
        "save_final": True,
        "out_dir": str(root / out),
    }
    cfg.update(changes)
    return cfg


LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lr": 1e-2}


def _train_here(config: dict) -> None:
    threads = torch.get_num_threads()
    try:
        train(TrainConfig(**config))
    finally:
        torch.set_num_threads(threads)


def _torchrun(root: Path, target: list[str], configs: list[dict], *args: str):
    """`torchrun --standalone --nproc_per_node 2 TARGET CONFIG.json... ARGS` in `root`."""
    paths = []
    for config in configs:
        paths.append(root / f"{Path(config['out_dir']).name}.json")
        paths[-1].write_text(json.dumps(config), encoding="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [*target, *map(str, paths), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        cmd, check=False, cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The corpus; one process's runs (global batch 8: batch_size 4 x grad_accum 2),
    full and LoRA; and two torchrun launches of 2 processes with batch_size 2:

    * `rgemma train --config fsdp.json` (`-m rgemma`): FSDP2, global_batch_size 8
      (grad_accum 2 derived), activation checkpointing;
    * `tests/distributed/train_configs.py ddp.json lora_fsdp.json`: DDP with
      grad_accum 2, then FSDP2 with LoRA.
    """
    root = tmp_path_factory.mktemp("dist")
    (root / "train.txt").write_text(_text(0, 3000), encoding="utf-8")
    (root / "val.txt").write_text(_text(1, 600), encoding="utf-8")
    _train_here(_config(root, "one"))
    _train_here(_config(root, "lora_one", **LORA))
    fsdp = _config(root, "fsdp", batch_size=2, grad_accum=1, global_batch_size=8)
    proc = _torchrun(
        root, ["-m", "rgemma", "train", "--config"], [fsdp], "gradient_checkpointing=true"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("final model:") == 1  # rank 0 alone prints the summary
    ddp = _config(root, "ddp", batch_size=2, data_parallel="ddp")
    lora = _config(root, "lora_fsdp", batch_size=2, **LORA)
    helper = Path(__file__).parent / "distributed" / "train_configs.py"
    proc = _torchrun(root, [str(helper)], [ddp, lora])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _records(out_dir: Path, event: str) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def _check_equals_one_process(runs: Path, two: str, one: str = "one") -> None:
    one, two = runs / one, runs / two
    # Rank 0 alone writes: one start record, one record per step.
    assert len(_records(two, "start")) == 1
    start = _records(two, "start")[0]
    assert (start["world_size"], start["global_batch_size"]) == (2, 8)
    # The per-step loss curve (global mean over both ranks) is one process's.
    expect = [(r["step"], r["loss"]) for r in _records(one, "train")]
    got = [(r["step"], r["loss"]) for r in _records(two, "train")]
    assert [s for s, _ in got] == [s for s, _ in expect] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(got, expect):
        assert abs(a - b) <= 1e-5, (step, a, b)
    for a, b in zip(_records(two, "train"), _records(one, "train")):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # So are the evaluation (every rank scores the same documents) and the final
    # model (gathered on rank 0 into a normal model directory).
    assert _records(two, "eval")[-1]["val_loss"] == pytest.approx(
        _records(one, "eval")[-1]["val_loss"], abs=1e-5
    )
    from rgemma.checkpoint import load_model

    a, b = load_model(two / "final"), load_model(one / "final")
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)


def test_fsdp_two_processes_train_like_one(runs):
    _check_equals_one_process(runs, "fsdp")
    start = _records(runs / "fsdp", "start")[0]
    assert (start["data_parallel"], start["grad_accum"]) == ("fsdp", 2)


def test_ddp_two_processes_train_like_one(runs):
    _check_equals_one_process(runs, "ddp")
    assert _records(runs / "ddp", "start")[0]["data_parallel"] == "ddp"


def test_lora_fsdp_two_processes_train_like_one(runs):
    _check_equals_one_process(runs, "lora_fsdp", one="lora_one")
    # The final directory: the merged model, and the adapter in PEFT's format.
    from safetensors import safe_open

    for run in ("lora_one", "lora_fsdp"):
        adapter = runs / run / "final" / "adapter"
        peft = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
        assert (peft["peft_type"], peft["r"], peft["lora_alpha"]) == ("LORA", 4, 8.0)
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            keys = list(f.keys())
        assert keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    # Only the adapted projections moved from the base (the seed's fresh model).
    from rgemma.checkpoint import load_model

    torch.manual_seed(0)
    base = Griffin(model_config_from(_config(runs, "x")["model"])).state_dict()
    merged = load_model(runs / "lora_fsdp" / "final").state_dict()
    for name in ("embedder.input_embedding", "blocks.0.recurrent_block.rg_lru.a_param"):
        assert torch.equal(merged[name], base[name]), name
    name = "blocks.0.mlp_block.ffw_down.weight"
    assert not torch.allclose(merged[name], base[name], atol=1e-6)


@pytest.mark.parametrize("rank", ["0", "1"])
def test_cli_error_is_reported_by_rank_0_only(tmp_path, monkeypatch, capsys, rank):
    from rgemma.cli import main

    # Every rank fails alike (here: no rendezvous address); each exits 2, rank 0 says why.
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    config = tmp_path / "c.json"
    config.write_text(json.dumps(_config(tmp_path, "run")), encoding="utf-8")
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--config", str(config)]) == 2
    finally:
        torch.set_num_threads(threads)
    err = capsys.readouterr().err
    if rank == "0":
        assert (
            err.startswith("rgemma: error: WORLD_SIZE=2 but MASTER_ADDR") and err.count("\n") == 1
        )
    else:
        assert err == ""


# ----------------------------------------------------------------------------------
# One process
# ----------------------------------------------------------------------------------
def test_activation_checkpointing_same_loss_and_gradients():
    cfg = GriffinConfig.preset("test-tiny")  # recurrent and attention blocks
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 21), generator=g)
    pos = torch.cat([torch.arange(12), torch.arange(9)])[None].repeat(2, 1)  # 2 documents
    mask = torch.ones(2, 20)

    def run(checkpointed: bool) -> tuple[torch.Tensor, dict, int]:
        torch.manual_seed(0)
        model = Griffin(cfg).train()
        if checkpointed:
            apply_activation_checkpointing(model)
        calls = []
        # A pre-hook: a recomputation stops once it has what the backward needs.
        model.blocks[0].mlp_block.register_forward_pre_hook(lambda *_: calls.append(1))
        nll, _ = LMObjective(model)(tokens[:, :-1], pos[:, :-1], tokens[:, 1:], mask)
        nll.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return nll.detach(), grads, len(calls)

    loss, grads, calls = run(False)
    loss_ac, grads_ac, calls_ac = run(True)
    assert (calls, calls_ac) == (1, 2)  # the block ran again in the backward pass
    torch.testing.assert_close(loss_ac, loss, rtol=0, atol=0)
    assert list(grads_ac) == list(grads)  # parameter names unchanged
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ac[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_global_batch_size_sets_grad_accum():
    cfg = TrainConfig(model="test-tiny", batch_size=2, global_batch_size=16)
    assert [cfg.grad_accum_for(w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert TrainConfig(model="test-tiny", grad_accum=3).grad_accum_for(4) == 3
    with pytest.raises(ConfigError, match="global_batch_size 16 does not divide across 3"):
        cfg.grad_accum_for(3)
    with pytest.raises(ConfigError, match="does not divide across 16 process"):
        cfg.grad_accum_for(16)
    with pytest.raises(ConfigError, match="grad_accum .2. and global_batch_size"):
        TrainConfig(model="test-tiny", grad_accum=2, global_batch_size=16)
    with pytest.raises(ConfigError, match="data_parallel must be 'fsdp' or 'ddp', got 'zero'"):
        TrainConfig(model="test-tiny", data_parallel="zero")


def test_local_rows_are_this_ranks_slice():
    rows = torch.arange(6)[:, None].expand(6, 3)
    batch = Batch(rows, rows + 10, rows + 20, rows.float())
    for rank, expect in ((0, [0, 1, 2]), (1, [3, 4, 5])):
        dist = Dist(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        part = local_rows(batch, dist)
        assert isinstance(part, Batch)
        assert part.tokens[:, 0].tolist() == expect
        assert part.loss_mask[:, 0].tolist() == [float(r) for r in expect]
    assert local_rows(batch, ONE) is batch
    three = Dist(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(InputError, match="6 rows does not split over 4 ranks"):
        local_rows(batch, three)


@pytest.mark.parametrize(
    "env, match",
    [
        ({"RANK": "x"}, "RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is not in \[0, WORLD_SIZE=2\)"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be >= 1"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "3"}, "LOCAL_RANK=3 is not in"),
    ],
)
def test_bad_torchrun_environment(env, match):
    with pytest.raises(ConfigError, match=match):
        read_env(env)


def test_init_distributed_one_process_and_missing_rendezvous():
    assert init_distributed("cpu", env={}) == ONE
    assert read_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    with pytest.raises(ConfigError, match="MASTER_ADDR and MASTER_PORT not set: start"):
        init_distributed("cpu", env={"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="TrainConfig.device"):
        init_distributed("cuda:7" if not torch.cuda.is_available() else "meta", env={})


def test_ranks_with_different_configs_fail_at_start_instead_of_hanging(monkeypatch):
    """Every rank compares its config with the others' (all_gather_object) before any
    training collective, so mismatched launches name the fields instead of waiting."""
    import rgemma.training.distributed as D
    from rgemma.errors import ConfigError

    mine = {"batch_size": 2, "lr": 0.01, "out_dir": "o"}
    theirs = {"batch_size": 4, "lr": 0.01, "out_dir": "o"}

    def gather(out, obj):
        out[:] = [obj, theirs]

    monkeypatch.setattr(D.tdist, "all_gather_object", gather)
    two = D.Dist(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"batch_size \(2 on rank 0, 4 on rank 1\)"):
        D.check_same_config(mine, two)
    D.check_same_config(theirs, two)  # equal: no error
    D.check_same_config(mine, D.Dist(0, 1, 0, torch.device("cpu")))  # one process: no call
