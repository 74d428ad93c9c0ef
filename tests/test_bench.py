"""The benchmark harness (`benchmarks/`) and `rgemma bench`: functional checks only
(no timing is asserted).

The memory pre-check refuses shapes that cannot fit before allocating; the machine
measurement returns positive numbers; a tiny run produces every table; failures of
a worker are recorded, not fatal; the synthetic decode states have the shapes
prefill leaves; `rgemma bench` derives its throughput and GB/s from its timings.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import adapters, harness, machine, peers, report, run_all
from benchmarks.harness import BenchOptions, run_benchmarks
from benchmarks.machine import (
    BenchMemoryError,
    GiB,
    check_memory,
    estimate_memory,
    measure_machine,
)
from benchmarks.peers import GemmaShape
from benchmarks.report import format_table
from benchmarks.worker import run_worker
from rgemma.config import GriffinConfig
from rgemma.errors import RgemmaError

TINY = GriffinConfig.preset("test-small")
TINY_GEMMA = GemmaShape(
    vocab_size=512,
    hidden_size=64,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=32,
    intermediate_size=256,
)


# ----------------------------------------------------------------------------------
# Memory pre-check
# ----------------------------------------------------------------------------------
def test_check_memory_refuses_absurd_shape_with_the_numbers():
    cfg = GriffinConfig.preset("recurrentgemma-9b")
    with pytest.raises(BenchMemoryError) as err:
        check_memory(cfg, "float32", "rgemma", available=8 * GiB)
    msg = str(err.value)
    assert isinstance(err.value, RgemmaError)
    assert "needs an estimated ~32" in msg and "8.0 GiB is available" in msg
    # A shape that fits passes and returns the estimate.
    est = check_memory(TINY, "float32", "rgemma", available=8 * GiB)
    assert est.weights == TINY.num_parameters() * 4


def test_cli_refuses_before_allocating(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"

    def must_not_build(*args, **kwargs):
        raise AssertionError("a model was built or a worker started before the refusal")

    # Refused from the config alone: no model is built, no worker is started.
    monkeypatch.setattr("rgemma.model.Griffin.__init__", must_not_build)
    monkeypatch.setattr(harness, "run_worker", must_not_build)
    rc = run_all.main(
        [
            "--preset",
            "recurrentgemma-9b",
            "--dtype",
            "float32",
            "--memory-limit",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "needs an estimated" in err and "4.0 GiB" in err
    assert not out.exists()


def test_estimates_follow_each_implementation():
    cfg = GriffinConfig.preset("recurrentgemma-2b-6l")

    def act(impl, n, kind="prefill", conf=cfg):
        e = estimate_memory(conf, "bfloat16", impl, kind=kind, length=n)
        return e.activations + e.cache

    # The official attention is quadratic in the prompt; rgemma's chunked prefill is not.
    assert act("official", 16384) > 3.5 * act("official", 8192)
    assert act("rgemma", 32768) == act("rgemma", 4096)
    # Gemma's KV cache grows with the position; rgemma's decode state does not.
    g = GemmaShape()
    assert act("gemma", 32768, "decode", g) > 7 * act("gemma", 4096, "decode", g)
    assert act("rgemma", 32768, "decode") == act("rgemma", 4096, "decode")
    int8 = machine.weight_bytes(cfg, "float32", "rgemma-int8")
    assert 0.25 < int8 / machine.weight_bytes(cfg, "float32", "rgemma") < 0.3


# ----------------------------------------------------------------------------------
# Machine, helpers
# ----------------------------------------------------------------------------------
def test_measure_machine_returns_positive_numbers():
    m = measure_machine(bandwidth_mib=16, matmul_n=128, repeats=2)
    for key in (
        "cores_logical",
        "memory_total_bytes",
        "memory_available_bytes",
        "torch_threads",
        "bandwidth_copy_gbs",
        "bandwidth_read_gbs",
        "bandwidth_gbs",
        "matmul_fp32_gflops",
    ):
        assert m[key] > 0, key
    assert m["versions"]["torch"] and m["cpu"]
    json.dumps(m)  # serialisable


def test_summarize_integrate_and_table():
    s = machine.summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    # Constant step time: N steps cost N times it; a linear ramp integrates exactly.
    assert report.integrate_steps([(100, 0.5)], 100, 10) == pytest.approx(5.0)
    assert report.integrate_steps([(0, 1.0), (100, 2.0)], 0, 100) == pytest.approx(150.0)
    text = format_table(["impl", "tok/s"], [["a", 1234.5], ["bb", None]], "T")
    lines = text.splitlines()
    assert lines[0] == "T" and lines[1].startswith("impl") and "1,234" in lines[3]
    assert lines[4].endswith("-")


# ----------------------------------------------------------------------------------
# Synthetic decode states have the shapes a real prefill leaves
# ----------------------------------------------------------------------------------
def _shapes(ad):
    if isinstance(ad, adapters.RgemmaAdapter):
        return [tuple(t.shape) for b in ad.state.blocks for t in b] + [tuple(ad.state.next_pos)]
    if isinstance(ad, adapters.OfficialAdapter):
        return [tuple(t.shape) for c in ad.cache.values() for t in c] + [tuple(ad.pos.tolist())]
    return [
        tuple(layer.keys.shape)
        for layer in ad.cache.layers
        if getattr(layer, "keys", None) is not None
    ] + [ad.cache.get_seq_length()]


@pytest.mark.parametrize("impl", ["rgemma", "official", "hf", "gemma"])
def test_synthetic_state_matches_prefill(impl):
    if impl == "official":
        pytest.importorskip("recurrentgemma.torch")
    if impl in ("hf", "gemma"):
        pytest.importorskip("transformers")
    spec = (
        {"kind": "gemma", "shape": vars(TINY_GEMMA), "seed": 0}
        if impl == "gemma"
        else {"kind": "random", "config": TINY.to_dict(), "seed": 0}
    )
    ad = adapters.build_adapter(impl, spec, "float32")
    position = 40  # beyond the window (16)
    with torch.inference_mode():
        ad.start_decode(2, position, "prefill")
        ad.step()
        real = _shapes(ad)
        ad.start_decode(2, position, "synthetic")
        ad.step()
        synthetic = _shapes(ad)
        assert torch.isfinite(ad.next.float()).all() and ad.next.shape == (2, 1)
    assert synthetic == real


def test_identical_random_weights_give_the_same_logits():
    pytest.importorskip("recurrentgemma.torch")
    spec = {"kind": "random", "config": TINY.to_dict(), "seed": 3}
    tokens = torch.randint(0, TINY.vocab_size, (1, 12))
    with torch.inference_mode():
        ours = adapters.build_adapter("rgemma", spec, "float32")
        official = adapters.build_adapter("official", spec, "float32")
        pos = torch.arange(12)[None]
        ref = official.model(tokens, pos)[0]
        torch.testing.assert_close(ours.logits(tokens), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------
# Workers and a tiny end-to-end run
# ----------------------------------------------------------------------------------
def test_worker_failures_are_recorded_and_the_rest_runs():
    spec = {"kind": "random", "config": TINY.to_dict(), "seed": 0}
    tasks = [
        {"id": "prefill:16", "kind": "prefill", "length": 16, "repeats": 1},
        {"id": "prefill:4000000", "kind": "prefill", "length": 4_000_000, "repeats": 1},
        {"id": "prefill:8000000", "kind": "prefill", "length": 8_000_000, "repeats": 1},
        {"id": "decode:b1:p20", "kind": "decode", "position": 20, "batch": 1, "steps": 2},
    ]
    logs = []
    run = run_worker(
        "rgemma",
        spec,
        "float32",
        tasks,
        config=TINY,
        budget_s=1000,
        threads=1,
        task_timeout=3,
        log=logs.append,
    )
    res = run["results"]
    first = res["prefill:16"]
    # The record is `machine.throughput` of its own runs (16 tokens, batch 1), whose
    # arithmetic `test_throughput_of_fixed_runs` pins on fixed durations.
    assert first["status"] == "ok"
    runs = first["seconds"]["runs"], first["cpu_seconds"]["runs"]
    assert {k: first[k] for k in machine.throughput(16, *runs)} == machine.throughput(16, *runs)
    # Depending on how fast the first point ran, the huge prompt is predicted too slow
    # and skipped, or it starts and is killed at the time-out (then the worker is
    # replaced and the next huge one is not run). Either way it is recorded, and the
    # rest still runs.
    huge = res["prefill:4000000"]["status"]
    assert huge in ("timeout", "skipped")
    if huge == "timeout":
        assert res["prefill:8000000"]["status"] == "not-run"
        assert len(run["workers"]) == 2
    else:
        assert res["prefill:8000000"]["status"] == "skipped"
    assert res["decode:b1:p20"]["status"] == "ok"


def test_throughput_of_fixed_runs():
    """tok/s at the median, slowest and fastest run; tok per CPU-second at the median."""
    rec = machine.throughput(16, [0.5, 2.0, 1.0], [0.25, 1.0, 0.5])
    assert rec["seconds"]["median"] == 1.0 and rec["seconds"]["n"] == 3
    assert (rec["tokens_per_s_min"], rec["tokens_per_s"], rec["tokens_per_s_max"]) == (8, 16, 32)
    assert rec["tokens_per_cpu_s"] == 32.0
    with pytest.raises(ValueError):
        machine.throughput(16, [], [])


def test_quick_run_produces_every_table(tmp_path):
    opts = BenchOptions(
        impls=("rgemma",),
        sections=("prefill", "decode", "int8"),
        prefill_lengths=(16, 32),
        prefill_repeats=2,
        decode_positions=(16, 40),
        batches=(1, 2),
        decode_steps=2,
        sample_prompt=16,
        sample_new=(8, 24),
        sample_direct_max=8,
        int8_position=20,
        int8_dtypes=("float32",),
        max_seconds_per_point=60,
        target_seconds_per_point=1,
        threads=1,
        out_dir=str(tmp_path),
        preset=None,
        shape="quick",
        machine_bandwidth_mib=16,
        machine_matmul_n=256,
    )
    # The tiny Griffin shape, not the quick default: fastest possible. (The peers'
    # adapters are checked in-process above: a worker each would double the time.)
    opts.griffin = lambda: TINY  # type: ignore[method-assign]
    res = run_benchmarks(opts, log=lambda s: None)
    impls = set(opts.impls)
    assert {r["impl"] for r in res["prefill"]} == impls
    assert {(r["impl"], r["length"]) for r in res["prefill"]} >= {(i, 32) for i in impls}
    for r in res["prefill"] + res["decode"]:
        assert r["status"] == "ok", r
        assert {"tokens_per_s", "tokens_per_s_min", "tokens_per_s_max"} <= r.keys()
        assert r["peak_rss"] >= 2**20  # a measured peak memory for each point
    for r in res["decode"]:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["step_s"])
    assert {(r["batch"], r["position"]) for r in res["decode"]} >= {(1, 16), (2, 40), (1, 24)}
    for r in res["sampling"]:  # batch x N tokens over prefill + integrated decode time
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * r["new"] / r["total_s"])
    direct = [
        r for r in res["sampling"] if r["impl"] == "rgemma" and r["new"] == 8 and r["batch"] == 1
    ]
    assert direct[0]["direct_total_s"] > 0
    assert {"weight_gb", "fraction", "fraction_with_state"} <= set(res["efficiency"][0])
    models = {r["model"] for r in res["int8"]["rows"]}
    assert {"rgemma:float32", "rgemma-int8"} <= models
    q = res["int8"]["quality_random"]
    assert q["status"] == "ok" and 0 < q["mean_abs_logit_diff"] <= q["max_abs_logit_diff"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["bandwidth_gbs"] > 0
    text = (tmp_path / "tables.txt").read_text()
    for title in ("1. Prefill", "2. Decode", "2b. Sampling", "3. Decode efficiency", "4. int8"):
        assert title in text
    if harness._have_peer("matplotlib"):
        assert {p.name for p in tmp_path.glob("*.png")} >= {
            "prefill.png",
            "decode.png",
            "sampling.png",
            "efficiency.png",
        }
    md = report.write_results_md([tmp_path], tmp_path / "RESULTS.md")
    assert "Command:" in md.read_text() and "Machine:" in md.read_text()
    # A rewrite keeps the hand-written text around the generated part.
    first = md.read_text()
    md.write_text("# Summary\nhand-written\n\n" + first + "\n## Serving\nmore\n")
    report.write_results_md([tmp_path], md)
    again = md.read_text()
    assert again.startswith("# Summary\nhand-written\n") and again.endswith("## Serving\nmore\n")
    assert again.count(report.GENERATED_BEGIN) == 1 and again.count("Command:") == 1


# ----------------------------------------------------------------------------------
# `rgemma bench`: rgemma alone, inside the package
# ----------------------------------------------------------------------------------
def test_rgemma_bench_derives_throughput_and_gbs_from_its_timings(capsys):
    from rgemma.cli import bench as cli_bench
    from rgemma.cli import main

    model = peers.random_griffin(TINY, "float32", seed=0)
    rows = cli_bench.measure(model, prompt_length=16, batch_sizes=(1, 3), steps=2, repeats=1)
    assert [(r["phase"], r["batch"]) for r in rows] == [
        ("prefill", 1),
        ("decode", 1),
        ("decode", 3),
    ]
    assert rows[0]["tokens_per_s"] == pytest.approx(16 / rows[0]["seconds"])
    # Bytes read per decode step: every weight once (the tied embedding once) + the state.
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert cli_bench.weight_nbytes(model) == weights == TINY.num_parameters() * 4
    for r in rows[1:]:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / r["seconds"])
        assert r["bytes_per_step"] == weights + model.state_nbytes(r["batch"])
        assert r["gbs"] == pytest.approx(r["bytes_per_step"] / r["seconds"] / 1e9)
    bw = cli_bench.measure_bandwidth(8, repeats=2)
    assert len(bw["copy"]) == len(bw["read"]) == 2 and min(bw["copy"] + bw["read"]) > 0

    argv = ["bench", "--preset", "test-small", "--prompt-length", "16", "--steps", "2"]
    argv += ["--batch-sizes", "1,2", "--repeats", "1", "--bandwidth-mib", "8", "--threads", "1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["phase", "batch", "tokens/s", "ms/step", "GB/s", "of", "bandwidth"]
    assert lines[1].split()[:3] == ["prefill", "16", "1"]
    assert [line.split()[:2] for line in lines[2:]] == [["decode", "1"], ["decode", "2"]]
    assert all(line.endswith("%") for line in lines[2:])
    assert "test-small" in err and "python benchmarks/run_all.py" in err
    assert main(argv + ["--model", "somewhere"]) == 2
    assert "either --model or --preset" in capsys.readouterr().err
    assert main(["bench", "--steps", "0"]) == 2
    assert capsys.readouterr().err == "rgemma: error: --steps must be >= 1, got 0\n"
