"""What rgemma does for GPUs, checked on CPU: decode with the sampled ids read every
few steps gives the outputs of reading them every step; a GPU out of memory during
prefill is a one-line error with the prompt length and an estimate; `--device cuda`
without CUDA names what is missing; the prepared GPU check runs end to end in its
--smoke mode. (The Triton kernels: tests/ops/test_triton.py.)"""

import copy

import pytest
import torch
from conftest_gen import ScriptedModel, tiny_model, tokenizer

from rgemma import InputError, generate
from rgemma import engine as engine_mod
from rgemma import generation as generation_mod
from rgemma.device import resolve_device


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [2] + torch.randint(8, 400, (n - 1,), generator=g).tolist()


def _generate_counting(monkeypatch, sync_every, *args, **kwargs):
    """generate() with the engine reading ids every `sync_every` steps; returns the
    results and the number of host reads of sampled ids (`_sample` calls + blocks)."""
    reads = []
    real_sample = engine_mod.RowEngine._sample

    def sample(self, logits, rows):
        reads.append("step")
        return real_sample(self, logits, rows)

    monkeypatch.setattr(engine_mod.RowEngine, "_sample", sample)
    monkeypatch.setattr(generation_mod._Generation, "sync_every", sync_every)
    real_defer = engine_mod.RowEngine._defer

    def defer(self, logits):
        out = real_defer(self, logits)
        if not self._pending:  # a block was read
            reads.append("block")
        return out

    monkeypatch.setattr(engine_mod.RowEngine, "_defer", defer)
    # generate() asks for deferral (None); force the value under test on CPU too.
    real_init = engine_mod.RowEngine.__init__

    def init(self, *a, **kw):
        kw["sync_every"] = sync_every
        real_init(self, *a, **kw)

    monkeypatch.setattr(engine_mod.RowEngine, "__init__", init)
    results = generate(*args, **kwargs)
    monkeypatch.undo()
    return results, reads


@pytest.mark.parametrize(
    "options",
    [{}, {"temperature": 0.9, "top_p": 0.95, "seed": 3}],
    ids=["greedy", "seeded"],
)
def test_deferred_reads_give_the_outputs_of_per_step_reads(options, monkeypatch):
    model, tok = tiny_model(), tokenizer()
    prompts = [_ids(5, 1), _ids(9, 2), _ids(3, 3)]
    want, step_reads = _generate_counting(
        monkeypatch, 1, model, tok, prompts, max_new_tokens=11, **options
    )
    got, reads = _generate_counting(
        monkeypatch, 4, model, tok, prompts, max_new_tokens=11, **options
    )
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.text for r in got] == [r.text for r in want]
    assert [r.finish_reason for r in got] == [r.finish_reason for r in want] == ["length"] * 3
    # Per step: the first token (prefill) + 10 steps; deferred: first + blocks 4, 4, 2.
    assert step_reads.count("step") == 11
    assert reads == ["step", "block", "block", "block"]


def test_deferred_reads_drop_ids_after_a_stop_token(monkeypatch):
    """Rows stopping on EOS / <end_of_turn> in the middle of a block end exactly
    there; the others run to their limit."""
    tok = tokenizer()
    sm = ScriptedModel(copy.deepcopy(tiny_model()))
    p0, p1, p2 = _ids(4, 10), _ids(7, 11), _ids(2, 12)
    hello = tok.encode("Hello world", add_bos=False)
    sm.script(p0, [*hello, tok.eos_id, 300, 301])
    sm.script(p1, [tok.end_of_turn_id, 302])
    sm.script(p2, hello + hello)
    n = len(hello) + 3
    want, _ = _generate_counting(monkeypatch, 1, sm, tok, [p0, p1, p2], max_new_tokens=n)
    got, reads = _generate_counting(monkeypatch, 3, sm, tok, [p0, p1, p2], max_new_tokens=n)
    for g, w in zip(got, want):
        assert (g.token_ids, g.text, g.finish_reason, g.stop_token_id) == (
            w.token_ids,
            w.text,
            w.finish_reason,
            w.stop_token_id,
        )
    assert got[0].token_ids == hello and got[0].stop_token_id == tok.eos_id
    assert got[1].token_ids == [] and got[1].finish_reason == "stop"
    assert got[2].finish_reason == "length"
    assert "block" in reads


def test_rows_with_stop_strings_read_every_step(monkeypatch):
    """Stop strings need the text: such rows are never deferred (the rule)."""
    model, tok = tiny_model(), tokenizer()
    got, reads = _generate_counting(
        monkeypatch, 4, model, tok, [_ids(5, 1)], max_new_tokens=6, stop=["zzzz"]
    )
    assert "block" not in reads and reads.count("step") == 6
    want = generate(model, tok, [_ids(5, 1)], max_new_tokens=6, stop=["zzzz"])
    assert got[0].token_ids == want[0].token_ids


def test_sync_every_defaults_to_per_step_on_cpu():
    engine = engine_mod.RowEngine(tiny_model(), tokenizer(), sync_every=None)
    assert engine.sync_every == 1
    assert engine_mod.RowEngine(tiny_model(), tokenizer()).sync_every == 1


def test_gpu_out_of_memory_in_prefill_is_one_line(monkeypatch):
    model = copy.deepcopy(tiny_model())

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(model, "forward", oom)
    tokens = torch.zeros(2, 3000, dtype=torch.long)
    with pytest.raises(InputError) as err:
        engine_mod.prefill(model, tokens, chunk_size=512)
    msg = str(err.value)
    assert msg.startswith(
        "GPU out of memory prefilling 2 x 3,000 tokens (chunks of 512): estimated"
    )
    assert "GiB (weights" in msg and "\n" not in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_device_cuda_without_cuda_names_what_is_missing():
    with pytest.raises(InputError) as err:
        resolve_device("cuda", what="--device")
    msg = str(err.value)
    assert msg.startswith("--device cuda: CUDA is not available on this machine: ")
    assert ("has no CUDA support" in msg) == (torch.version.cuda is None)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    """benchmarks/gpu_check.py --smoke: every section on CPU at tiny shapes, results
    written, float32 parity within the 1e-4 target."""
    from benchmarks import gpu_check

    res = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    assert res["errors"] == {}
    assert res["parity"]["float32_within_1e-4"] is True
    assert res["parity"]["bfloat16"]["full"] < 0.2
    for section in ("prefill", "decode"):
        rows = res[section]["tiny"]
        assert rows and all("tok_s" in r and r["tok_s"] > 0 for r in rows.values()), rows
    assert res["train"]["rgemma"]["tok_s"] > 0
    assert (tmp_path / "gpu_check.json").exists()
    assert "## Parity" in (tmp_path / "gpu_check.md").read_text()
