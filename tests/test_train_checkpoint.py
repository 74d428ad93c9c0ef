"""Training checkpoints (`rgemma.training.checkpoint`, `training.stop`): the DCP round
trip is exact, a checkpoint is visible only when complete, `load_model` reads one;
SIGTERM / SIGINT stop a run with a checkpoint that resumes exactly; a full disk is a
one-line error that keeps the previous checkpoint; a deleted checkpoint directory is
noticed; a 2-process run (torchrun, gloo) killed inside a checkpoint resumes on 1
process, which 2 processes resume in turn, with the uninterrupted run's losses.

Tiny models with one thread. SIGTERM goes to a `python -m rgemma train` subprocess
once it has logged a step; SIGINT is sent by the test process to itself during a
step (and again during the checkpoint); the full disk is a file-size limit
(RLIMIT_FSIZE) set around an in-process `rgemma train`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rgemma.checkpoint import load_model
from rgemma.config import GriffinConfig
from rgemma.errors import CheckpointError
from rgemma.model import Griffin
from rgemma.training import (
    TrainConfig,
    clean_incomplete,
    damaged_checkpoints,
    find_checkpoints,
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
    train,
)
from rgemma.training import checkpoint as ckpt_mod

TOKENIZER = Path(ckpt_mod.__file__).parent.parent / "assets" / "bundled" / "tokenizer.model"
pytestmark = pytest.mark.skipif(not TOKENIZER.is_file(), reason="bundled tokenizer missing")

WORDS = (  # noqa: SIM905
    "the a cat dog sat on mat and ran far away while birds sang in trees near old "
    "houses by quiet river where children played every summer day until evening came"
).split()
CPU = torch.device("cpu")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + "." for _ in range(250)]
    path = tmp_path / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _config(tmp_path: Path, corpus: Path, name: str, **changes) -> dict:
    """A tiny run as a JSON-able config. The learning rate is constant (min_lr = lr,
    no warm-up), so runs with different max_steps share their first steps."""
    cfg = {
        "model": {"preset": "test-tiny", "vocab_size": 4096},
        "tokenizer": str(TOKENIZER),
        "train_data": [str(corpus)],
        "val_fraction": 0.0,
        "doc_chars": 600,
        "seq_len": 32,
        "batch_size": 4,
        "max_steps": 6,
        "warmup_steps": 0,
        "lr": 3e-3,
        "min_lr": 3e-3,
        "save_every": 0,
        "eval_every": 0,
        "log_every": 1,
        "num_threads": 1,
        "out_dir": str(tmp_path / name),
        "progress": False,
        "save_final": False,
    }
    cfg.update(changes)
    return cfg


def _logged_losses(run: Path) -> dict[int, float]:
    """{step: loss} of the train records in `run/metrics.jsonl`."""
    out = {}
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("event") == "train":
            out[rec["step"]] = rec["loss"]
    return out


def _start(
    cmd: list[str], tmp_path: Path, name: str, env: dict[str, str] | None = None, **kw
) -> subprocess.Popen:
    """Start `cmd` (one thread, `env` added) with its output to `tmp_path/name.log`."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    with open(tmp_path / f"{name}.log", "w") as log:  # the child keeps its own copy
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, **kw)


def _train_cmd(tmp_path: Path, cfg: dict, *args: str, launcher: list[str] | None = None):
    path = tmp_path / f"{Path(cfg['out_dir']).name}.json"
    path.write_text(json.dumps(cfg), encoding="utf-8")
    head = launcher or [sys.executable, "-m"]
    return [*head, "rgemma", "train", "--config", str(path), *args]


def _wait_for(what, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    """Poll `what()` until true; fail if `proc` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"the run ended early (exit {proc.returncode})"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _last_step(run: Path) -> int:
    """The last step `run` has logged (0: none yet)."""
    try:
        return max(_logged_losses(run), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------------
# One process, in this process
# ----------------------------------------------------------------------------------
def _tiny_setup(seed: int) -> tuple[Griffin, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = Griffin(GriffinConfig.preset("test-tiny"))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model: Griffin, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()
    ).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_round_trip_is_exact_and_a_checkpoint_loads_as_a_model(tmp_path):
    model, opt = _tiny_setup(0)
    _step(model, opt, 1)
    cfg = TrainConfig(model="test-tiny", out_dir=str(tmp_path), keep_last=2)
    data_state = {"step": 5, "seed": 0, "carried": {"next_pos": torch.arange(3)}}
    rng_at_save = torch.get_rng_state()
    path = save_checkpoint(
        tmp_path,
        7,
        model=model,
        optimizer=opt,
        cfg=cfg,
        data_state=data_state,
        tokens_seen=123,
        tokenizer_path=TOKENIZER,
        device=CPU,
        extra={"val": {"val_loss": 2.5}},
    )
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert names == {
        "COMPLETE",
        "dcp/.metadata",
        "dcp/__0_0.distcp",
        "rng/rank_00000.pt",
        "rgemma_config.json",
        "tokenizer.model",
        "train_config.json",
        "trainer_state.json",
        "trainer_state.pt",
    }
    assert find_checkpoints(tmp_path) == [(7, path)]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000007\n"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", path.name]
    readable = json.loads((path / "trainer_state.json").read_text())
    assert readable["data"] == {"step": 5, "seed": 0, "carried": {}}  # tensors left out
    assert (readable["step"], readable["tokens_seen"], readable["world_size"]) == (7, 123, 1)

    # Restore into a differently initialised model and a fresh optimizer: bitwise.
    other, other_opt = _tiny_setup(1)
    torch.manual_seed(99)
    info = load_checkpoint(path, model=other, optimizer=other_opt, device=CPU, seed=0)
    assert info["step"] == 7 and info["tokens_seen"] == 123 and info["val"] == {"val_loss": 2.5}
    assert torch.equal(info["data"]["carried"]["next_pos"], torch.arange(3))
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), other_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # ... so the next step is the same too.
    _step(model, opt, 2)
    _step(other, other_opt, 2)
    for (name, a), b in zip(model.named_parameters(), other.parameters()):
        assert torch.equal(a, b), name

    # load_model reads the checkpoint, the run directory (newest) or checkpoints/.
    saved = read_checkpoint_state(path)["model"]
    for where in (path, tmp_path, tmp_path / "checkpoints"):
        loaded = load_model(where)
        assert loaded.source["format"] == "training" and loaded.source["path"] == str(path)
        assert loaded.source["tokenizer"] == str(path / "tokenizer.model")
        assert all(torch.equal(p, saved[n]) for n, p in loaded.named_parameters())
    half = load_model(path, dtype=torch.bfloat16)
    assert half.embedder.input_embedding.dtype == torch.bfloat16
    from rgemma.cli import main  # rgemma convert: a normal model directory

    assert main(["convert", str(tmp_path), str(tmp_path / "plain"), "--to", "rgemma"]) == 0
    plain = load_model(tmp_path / "plain")
    assert plain.source["format"] == "rgemma"
    assert (tmp_path / "plain" / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    assert all(torch.equal(p, saved[n]) for n, p in plain.named_parameters())

    # keep_last: the oldest are renamed aside, then deleted.
    for step in (8, 9):
        save_checkpoint(
            tmp_path,
            step,
            model=model,
            optimizer=opt,
            cfg=cfg,
            data_state=data_state,
            tokens_seen=0,
            tokenizer_path=None,
            device=CPU,
        )
    assert [s for s, _ in find_checkpoints(tmp_path)] == [8, 9]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step_0000008",
        "step_0000009",
    ]


def test_incomplete_truncated_and_leftover_checkpoints(tmp_path):
    model, opt = _tiny_setup(0)
    cfg = TrainConfig(model="test-tiny", out_dir=str(tmp_path), keep_last=5)
    kw = {"data_state": {"step": 0}, "tokens_seen": 0, "tokenizer_path": None, "device": CPU}
    for step in (1, 2, 3):
        _step(model, opt, step)
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, cfg=cfg, **kw)
    root = tmp_path / "checkpoints"
    shard = root / "step_0000003" / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])  # cut short (a copy or a disk gone bad)
    (root / "step_0000002" / "COMPLETE").unlink()  # never finished
    assert [s for s, _ in find_checkpoints(tmp_path)] == [1]
    assert [p.name for p in damaged_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    with pytest.raises(CheckpointError, match=r"step_0000003 is incomplete or has a truncated"):
        load_model(root / "step_0000003")
    newest = load_model(tmp_path)  # a run directory: its newest complete checkpoint
    assert newest.source["path"] == str(root / "step_0000001")

    leftovers = [root / ".tmp-step_0000004", root / ".old-step_0000001", root / ".del-x"]
    for p in leftovers:
        (p / "dcp").mkdir(parents=True)
    (root / ".tmp-latest.abc").write_text("x")
    assert sorted(clean_incomplete(tmp_path)) == sorted([*leftovers, root / ".tmp-latest.abc"])
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        "step_0000001",
        "step_0000002",
        "step_0000003",
    ]
    shutil.rmtree(root / "step_0000001")
    with pytest.raises(CheckpointError, match="has no complete checkpoint"):
        load_model(tmp_path)


def test_lora_checkpoint_holds_the_adapters_and_loads_merged_on_its_base(tmp_path, corpus):
    from rgemma.checkpoint import save_model

    config = GriffinConfig.from_dict(
        {**GriffinConfig.preset("test-tiny").to_dict(), "vocab_size": 4096}
    )
    torch.manual_seed(0)
    base = save_model(Griffin(config), tmp_path / "base")
    cfg = _config(
        tmp_path, corpus, "lora", model=None, init_from=str(base), lora_rank=4, lora_alpha=8.0
    )
    result = train(dict(cfg, max_steps=2, save_final=True))
    state = read_checkpoint_state(result["checkpoint"])
    adapters = [k for k in state["model"] if ".lora_A." in k or ".lora_B." in k]
    assert adapters and len(adapters) == len(state["model"])  # no base weight
    moments = [k for k in state["optim"] if k.startswith("state.")]
    assert moments and all(".lora_" in k for k in moments)
    merged, final = load_model(result["checkpoint"]), load_model(result["final_dir"])
    for (name, a), b in zip(merged.named_parameters(), final.parameters()):
        assert torch.equal(a, b), name

    torch.manual_seed(1)  # the base directory now holds another model
    save_model(Griffin(config), base)
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters for base \w+, but its init_"):
        load_model(result["checkpoint"])
    with pytest.raises(CheckpointError, match=r"adapters were trained on base \w+, but init_from"):
        train(dict(cfg, max_steps=3, resume=True))


def test_interrupt_inside_a_save_discards_it(tmp_path, monkeypatch):
    """A second Ctrl-C (KeyboardInterrupt) while the checkpoint is written: the
    temporary directory goes, the previous checkpoint stays the newest."""
    model, opt = _tiny_setup(0)
    cfg = TrainConfig(model="test-tiny", out_dir=str(tmp_path))
    kw = {"data_state": {"step": 0}, "tokens_seen": 0, "tokenizer_path": None, "device": CPU}
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, cfg=cfg, **kw)
    real = torch.save

    def interrupted(obj, f, *args, **kwargs):
        if str(f).endswith("trainer_state.pt"):  # after the shards and the RNG file
            raise KeyboardInterrupt
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, cfg=cfg, **kw)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]
    assert (root / "latest").read_text() == "step_0000001\n"


def test_write_error_removes_the_temporary_directory(tmp_path, monkeypatch):
    """ENOSPC while the checkpoint is written: one line naming the directory and the
    bytes the checkpoint needs; nothing left behind. (The kernel's own EFBIG inside
    DCP's writer: `test_full_disk_...`.)"""
    model, opt = _tiny_setup(0)
    _step(model, opt, 1)
    cfg = TrainConfig(model="test-tiny", out_dir=str(tmp_path))
    kw = {"data_state": {"step": 0}, "tokens_seen": 0, "tokenizer_path": None, "device": CPU}
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, cfg=cfg, **kw)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod, "_write_rank0_files", full)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, cfg=cfg, **kw)
    root = tmp_path / "checkpoints"
    # Parameters and both AdamW moments in float32, and a float32 step per parameter.
    needed = 3 * 4 * sum(p.numel() for p in model.parameters()) + 4 * len(opt.state)
    assert re.fullmatch(  # the free space changes as others write: any number
        re.escape(
            f"no room to write checkpoint step_0000002 in {root} (No space left on "
            f"device): it needs about {ckpt_mod._human(needed)}, "
        )
        + r"[\d.]+ [KMGT]B free there; "
        + re.escape(f"the previous checkpoint {root / 'step_0000001'} is intact"),
        str(info.value),
    ), str(info.value)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000001"]


def test_deleted_checkpoint_directory_is_noticed(tmp_path, corpus, monkeypatch, capsys):
    loop = sys.modules["rgemma.training.loop"]
    real = loop.save_checkpoint

    def save_then_delete(out_dir, step, **kwargs):
        path = real(out_dir, step, **kwargs)
        if step == 2:
            shutil.rmtree(Path(out_dir) / "checkpoints")  # someone cleans up
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_delete)
    cfg = _config(tmp_path, corpus, "run", max_steps=4, save_every=2)
    train(cfg)
    first = tmp_path / "run" / "checkpoints" / "step_0000002"
    assert (
        f"rgemma: warning: checkpoint {first} has disappeared ({first.parent} deleted "
        "during the run?); writing step_0000004 anyway" in capsys.readouterr().err
    )
    assert [s for s, _ in find_checkpoints(tmp_path / "run")] == [4]


# ----------------------------------------------------------------------------------
# Stops: SIGTERM from outside, SIGINT (twice) from inside; a full disk
# ----------------------------------------------------------------------------------
def test_sigterm_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, corpus):
    cfg = _config(tmp_path, corpus, "run", max_steps=10_000)
    run = Path(cfg["out_dir"])
    proc = _start(_train_cmd(tmp_path, cfg), tmp_path, "run")
    try:
        _wait_for(lambda: _last_step(run) > 0, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0  # a preemption honoured
    finally:
        proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert "rgemma: SIGTERM received: stopping after this step with a checkpoint" in log
    ((stopped_at, path),) = find_checkpoints(run)
    assert (
        f"rgemma: stopped by SIGTERM after step {stopped_at}: checkpoint {path}; "
        "continue with --resume" in log
    )
    before = _logged_losses(run)
    assert sorted(before) == list(range(1, stopped_at + 1))

    resumed = train(dict(cfg, max_steps=stopped_at + 2, resume=True))
    reference = train(dict(cfg, max_steps=stopped_at + 2, out_dir=str(tmp_path / "ref")))
    assert resumed["losses"] == reference["losses"][stopped_at:]  # bitwise
    assert [before[s] for s in sorted(before)] == [v for _, v in reference["losses"][:stopped_at]]


def _interrupt_in_step(monkeypatch, step: int) -> None:
    """Send this process SIGINT (Ctrl-C) while optimiser step `step` runs."""
    loop = sys.modules["rgemma.training.loop"]
    real = loop.lr_at

    def lr_at(i, cfg):  # called at the start of each step
        if i + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(i, cfg)

    monkeypatch.setattr(loop, "lr_at", lr_at)


def test_sigint_stops_with_a_checkpoint_and_a_second_one_discards_it(
    tmp_path, corpus, monkeypatch, capfd
):
    from rgemma.cli import main

    reference = train(_config(tmp_path, corpus, "ref", max_steps=5))["losses"]
    capfd.readouterr()
    handler = signal.getsignal(signal.SIGINT)

    # Ctrl-C during step 3: the step finishes, is saved, and the command exits 130.
    cfg = _config(tmp_path, corpus, "once", max_steps=10_000)
    path = tmp_path / "once.json"
    path.write_text(json.dumps(cfg))
    _interrupt_in_step(monkeypatch, 3)
    assert main(["train", "--config", str(path)]) == 130
    err = capfd.readouterr().err
    assert "rgemma: SIGINT received: stopping after this step with a checkpoint" in err
    ckpt = tmp_path / "once" / "checkpoints" / "step_0000003"
    assert f"rgemma: stopped by SIGINT after step 3: checkpoint {ckpt}" in err
    assert find_checkpoints(tmp_path / "once") == [(3, ckpt)]
    assert signal.getsignal(signal.SIGINT) is handler  # given back
    monkeypatch.undo()
    resumed = train(dict(cfg, max_steps=5, resume=True))
    assert resumed["losses"] == reference[3:]  # bitwise

    # A second Ctrl-C while that checkpoint is written stops at once: the write is
    # discarded, the periodic checkpoint of step 2 stays the newest.
    cfg = _config(tmp_path, corpus, "twice", max_steps=10_000, save_every=2)
    _interrupt_in_step(monkeypatch, 3)
    real = ckpt_mod._write_rank0_files

    def interrupted_write(tmp, step, *args):
        if step == 3:  # DCP's shards and the RNG file are written by now
            os.kill(os.getpid(), signal.SIGINT)
        return real(tmp, step, *args)

    monkeypatch.setattr(ckpt_mod, "_write_rank0_files", interrupted_write)
    path = tmp_path / "twice.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", "--config", str(path)]) == 130
    root = tmp_path / "twice" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    monkeypatch.undo()
    resumed = train(dict(cfg, max_steps=5, resume=True))
    assert resumed["losses"] == reference[2:]


def test_full_disk_is_one_line_and_the_previous_checkpoint_loads(tmp_path, corpus, capfd):
    """A file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes the kernel refuse the
    shard's write with EFBIG, as a full disk refuses with ENOSPC."""
    from rgemma.cli import main

    cfg = _config(tmp_path, corpus, "run", max_steps=2)
    train(cfg)
    run = Path(cfg["out_dir"])
    root = run / "checkpoints"
    shard = root / "step_0000002" / "dcp" / "__0_0.distcp"
    limit = shard.stat().st_size // 2  # the shard does not fit; logs and metadata do
    path = tmp_path / "run.json"
    path.write_text(json.dumps(dict(cfg, max_steps=4)))
    capfd.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = main(["train", "--config", str(path), "--resume"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert code == 2
    errors = [x for x in capfd.readouterr().err.splitlines() if "error" in x]
    assert len(errors) == 1, errors
    assert re.fullmatch(
        rf"rgemma: error: no room to write checkpoint step_0000004 in {re.escape(str(root))} "
        r"\(File too large\): it needs about [\d.]+ MB, [\d.]+ [KMG]B free there; the previous "
        rf"checkpoint {re.escape(str(root / 'step_0000002'))} is intact",
        errors[0],
    ), errors[0]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]
    model = load_model(run)
    assert model.source["path"] == str(root / "step_0000002")


# ----------------------------------------------------------------------------------
# Two processes (torchrun, gloo): SIGKILL inside a checkpoint, resume on 2 and on 1
# ----------------------------------------------------------------------------------
def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), deepest last. torchrun starts its
    workers in sessions of their own, so a process-group kill would miss them."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            out += [child, *_descendants(child)]
    return out


def _worker(proc: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (its environment says RANK=rank)."""
    for pid in _descendants(proc.pid):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no worker of rank {rank} under torchrun")


def _kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL `proc` and everything below it (workers first), and reap it."""
    for pid in [*_descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_sigkill_in_a_checkpoint_then_resume_on_one_and_on_two_processes(tmp_path, corpus):
    """2 processes killed inside a checkpoint -> 1 process resumes (2 -> 1) -> 2
    processes resume that (1 -> 2) until SIGTERM reaches one of them: the losses of
    one uninterrupted process throughout."""
    # The checkpoint the kill lands in: drawn (seeded) from two periodic ones.
    kill_at = random.Random(1).choice([4, 6])
    cfg = _config(tmp_path, corpus, "run", batch_size=2, max_steps=10_000, save_every=2)
    run = Path(cfg["out_dir"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    torchrun += ["--nproc_per_node", "2", "-m"]

    # Rank 1 stalls inside the save of step `kill_at` after writing its shard; rank 0
    # waits for it. Kill every process there, as a lost machine would.
    stall = {ckpt_mod.STALL_ENV: f"1:{kill_at}"}
    proc = _start(_train_cmd(tmp_path, cfg, launcher=torchrun), tmp_path, "killed", stall)
    tmp_ckpt = run / "checkpoints" / f".tmp-step_{kill_at:07d}"
    try:
        _wait_for(lambda: (tmp_ckpt / "rng" / "rank_00001.pt").is_file(), proc)
    finally:
        _kill_all(proc)
    assert tmp_ckpt.is_dir()  # the kill landed inside the write ...
    assert damaged_checkpoints(run) == []  # ... and no step_ directory is incomplete
    assert [s for s, _ in find_checkpoints(run)] == list(range(2, kill_at, 2))

    # One process (the same global batch: 1 x 4 rows) continues for 3 steps ...
    one = train(dict(cfg, batch_size=4, max_steps=kill_at + 1, resume=True))
    assert [s for s, _ in one["losses"]] == [kill_at - 1, kill_at, kill_at + 1]

    # ... two processes continue from that 1-process checkpoint, until one of them
    # gets SIGTERM: both stop after the same step and write its checkpoint.
    proc = _start(_train_cmd(tmp_path, cfg, "--resume", launcher=torchrun), tmp_path, "two")
    try:
        _wait_for(lambda: _last_step(run) > kill_at + 1, proc)
        os.kill(_worker(proc, 1), signal.SIGTERM)  # rank 1 only, not torchrun
        assert proc.wait(timeout=300) == 0, (tmp_path / "two.log").read_text()[-3000:]
    finally:
        _kill_all(proc)
    stopped_at = find_checkpoints(run)[-1][0]
    assert damaged_checkpoints(run) == [] and stopped_at > kill_at + 1
    logged = _logged_losses(run)  # the killed run's, the 1-process run's, and these
    assert sorted(logged) == list(range(1, stopped_at + 1))

    reference = train(dict(cfg, batch_size=4, max_steps=stopped_at, out_dir=str(tmp_path / "ref")))
    assert max(abs(logged[s] - v) for s, v in reference["losses"]) < 1e-5
    assert max(abs(v - logged[s]) for s, v in one["losses"]) == 0  # logged as returned


def test_a_repeated_sigterm_still_saves_but_a_second_ctrl_c_stops_at_once():
    """torchrun sends each worker SIGTERM twice within milliseconds: the second must
    not turn the checkpointed stop into an immediate one (a second Ctrl-C does)."""
    import signal as sig

    from rgemma.training.stop import StopSignals

    with StopSignals() as stop:
        os.kill(os.getpid(), sig.SIGTERM)
        os.kill(os.getpid(), sig.SIGTERM)  # ignored
        assert stop.received == sig.SIGTERM
    with StopSignals() as stop:
        os.kill(os.getpid(), sig.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig.SIGINT)
        assert stop.received == sig.SIGINT
