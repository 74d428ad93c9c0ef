"""The `rgemma` command line: generate, chat, info, and its error handling."""

from __future__ import annotations

import copy
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_gen import tiny_model, tokenizer, tokenizer_dir
from oracle import random_model

from rgemma.cli import main
from rgemma.config import GriffinConfig
from rgemma.generation import ChatSession, generate

checkpoint = pytest.importorskip("rgemma.checkpoint")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save_model(tiny_model(), d, tokenizer_path=tokenizer_dir() / "tokenizer.model")
    return str(d)


@pytest.fixture(scope="module")
def mismatched_dir(tmp_path_factory) -> str:
    """A model of vocab 256 with the 400-piece tokenizer."""
    d = tmp_path_factory.mktemp("ckpt") / "mismatch"
    model = random_model(GriffinConfig.preset("test-tiny"))
    checkpoint.save_model(model, d, tokenizer_path=tokenizer_dir() / "tokenizer.model")
    return str(d)


def set_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------
def test_generate_streams_one_prompt(capsys, model_dir):
    rc, out, err = run(
        capsys,
        [
            "generate",
            "Hello world",
            "--model",
            model_dir,
            "--max-new-tokens",
            "12",
            "--threads",
            "1",
        ],
    )
    assert rc == 0 and err == ""
    expected = generate(tiny_model(), tokenizer(), "Hello world", max_new_tokens=12)[0]
    assert out == expected.text + "\n"


def test_generate_quantize_and_compile_options(capsys, monkeypatch, model_dir):
    """--quantize int8 equals rgemma.quantize; --compile goes through torch.compile
    (replaced here by a recording identity, so the test does not wait for a compiler)."""
    import rgemma.generation as gen_mod
    from rgemma import quantize

    compiled = []

    def fake_compile(fn, **kw):
        compiled.append(fn)
        return fn

    monkeypatch.setattr(gen_mod.torch, "compile", fake_compile)
    argv = ["generate", "Hello world", "--model", model_dir, "--max-new-tokens", "10"]
    rc, out, err = run(capsys, argv + ["--quantize", "int8", "--compile"])
    assert rc == 0 and err == ""
    assert len(compiled) == 1 and compiled[0].__name__ == "decode_step"
    expected = generate(
        quantize(copy.deepcopy(tiny_model())), tokenizer(), "Hello world", max_new_tokens=10
    )
    assert out == expected[0].text + "\n"


def test_generate_file_batch(capsys, model_dir, tmp_path):
    prompts = ["Hello", "To be, or not to be", "你好"]
    f = tmp_path / "prompts.txt"
    f.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n", encoding="utf-8")
    rc, out, err = run(
        capsys,
        [
            "generate",
            "--file",
            str(f),
            "--model",
            model_dir,
            "--max-new-tokens",
            "6",
            "--stop",
            "\\n\\n",
        ],
    )
    assert rc == 0, err
    results = generate(tiny_model(), tokenizer(), prompts, max_new_tokens=6, stop=["\n\n"])
    expected = "".join(
        f"=== [{i}/3] {p} ===\n{r.text}\n\n" for i, (p, r) in enumerate(zip(prompts, results), 1)
    )
    assert out == expected


def test_generate_stdin_and_invalid_utf8(capsys, monkeypatch, model_dir):
    set_stdin(monkeypatch, b"Hello \xff world\n")
    rc, out, err = run(
        capsys,
        ["generate", "-", "--model", model_dir, "--max-new-tokens", "5", "--verbose", "--chat"],
    )
    assert rc == 0
    lines = err.strip().splitlines()
    assert len(lines) == 2
    assert "warning" in lines[0] and "UTF-8" in lines[0] and "replaced" in lines[0]
    for word in ("prompt tokens", "generated tokens", "prefill", "decode", "tok/s", "bytes"):
        assert word in lines[1]
    expected = generate(
        tiny_model(), tokenizer(), "Hello \ufffd world", max_new_tokens=5, chat=True
    )[0]
    assert out == expected.text + "\n"


def test_generate_sampling_options(capsys, model_dir):
    argv = [
        "generate",
        "Hello",
        "--model",
        model_dir,
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.9",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--min-p",
        "0.01",
        "--seed",
        "3",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    ]
    rc, out, _ = run(capsys, argv)
    assert rc == 0
    assert run(capsys, argv)[1] == out
    expected = generate(
        tiny_model(),
        tokenizer(),
        "Hello",
        max_new_tokens=8,
        temperature=0.9,
        top_k=50,
        top_p=0.9,
        min_p=0.01,
        seed=3,
    )[0]
    assert out == expected.text + "\n"


# ----------------------------------------------------------------------------------
# chat and info
# ----------------------------------------------------------------------------------
def test_chat_save_and_continue(capsys, monkeypatch, model_dir, tmp_path):
    state = str(tmp_path / "talk.state")
    set_stdin(monkeypatch, b"Hello\n/reset\nHi there\n\nHow are you?\n")
    rc, out, err = run(
        capsys,
        [
            "chat",
            "--model",
            model_dir,
            "--max-new-tokens",
            "6",
            "--system",
            "Be brief.",
            "--save-state",
            state,
        ],
    )
    assert rc == 0, err
    ref = ChatSession(tiny_model(), tokenizer(), system="Be brief.", max_new_tokens=6)
    replies = [ref.send("Hello")]
    ref.reset()
    replies += [ref.send("Hi there"), ref.send("How are you?")]
    assert out == "".join(r + "\n" for r in replies)
    assert os.path.isfile(state) and os.path.isfile(state + ".json")

    set_stdin(monkeypatch, b"And then?\n/exit\nnot read\n")
    rc, out, err = run(
        capsys, ["chat", "--model", model_dir, "--max-new-tokens", "6", "--load-state", state]
    )
    assert rc == 0, err
    assert out == ref.send("And then?") + "\n"


def test_chat_ctrl_c_exits_130_and_saves(capsys, monkeypatch, model_dir, tmp_path):
    state = str(tmp_path / "c.state")
    lines = iter(["Hello"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr("builtins.input", fake_input)
    rc, _, err = run(
        capsys, ["chat", "--model", model_dir, "--max-new-tokens", "4", "--save-state", state]
    )
    assert rc == 130
    assert "Traceback" not in err and "error" not in err
    assert os.path.isfile(state)


def test_info(capsys, model_dir):
    rc, out, err = run(capsys, ["info", "--model", model_dir])
    assert rc == 0, err
    n = sum(p.numel() for p in tiny_model().parameters())
    assert f"{n:,}" in out
    assert f"{tiny_model().state_nbytes(1):,} bytes" in out
    assert "float32" in out and model_dir in out and "vocab_size" in out


# ----------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------
ERRORS = [
    (["generate", "hi", "--model", "{missing}"], "does not exist"),
    (["generate", "hi", "--model", "{empty}"], "no checkpoint found"),
    (["generate", "hi", "--model", "{mismatch}"], "400.*256"),
    (["generate", "hi", "--model", "{model}", "--temperature", "-1"], "--temperature.*-1"),
    (["generate", "hi", "--model", "{model}", "--top-p", "0"], "--top-p.*0"),
    (["generate", "hi", "--model", "{model}", "--top-p", "1.5"], "--top-p.*1.5"),
    (["generate", "hi", "--model", "{model}", "--top-k", "-1"], "--top-k.*-1"),
    (["generate", "hi", "--model", "{model}", "--min-p", "2"], "--min-p.*2"),
    (["generate", "hi", "--model", "{model}", "--max-new-tokens", "-1"], "--max-new-tokens.*-1"),
    (["generate", "--file", "{emptyfile}", "--model", "{model}"], "no prompts"),
    (["generate", "--file", "{missing}", "--model", "{model}"], "--file .*nope: no such file"),
    (["generate", "--file", "{empty}", "--model", "{model}"], "--file .*empty: is a directory"),
    (["generate", "hi", "--file", "{emptyfile}", "--model", "{model}"], "either PROMPT or"),
    (["generate", "--model", "{model}"], "no prompt"),
    (["generate", "hi", "--model", "{model}", "--device", "nonsense"], "--device"),
    (["generate", "hi", "--model", "{model}", "--threads", "0"], "--threads"),
    (["generate", "hi", "--model", "{model}", "--device", "meta"], "--device meta"),
    (["generate", "hi", "--model", "{model}", "--device", "xla"], "--device xla: this torch"),
    (["chat", "--model", "{model}", "--load-state", "{missing}"], "--load-state .*nope: no such"),
    (["chat", "--model", "{model}", "--load-state", "{empty}"], "--load-state .*: is a directory"),
    (["chat", "--model", "{missing}", "--save-state", "{empty}"], "--save-state .*: is a direc"),
    (["chat", "--model", "{missing}", "--save-state", "{missing}/s"], "--save-state .*does not"),
    (["info", "--model", "{missing}"], "does not exist"),
]


@pytest.mark.parametrize("argv, pattern", ERRORS)
def test_errors_are_one_line(capsys, model_dir, mismatched_dir, tmp_path, argv, pattern):
    import re

    (tmp_path / "empty").mkdir()
    (tmp_path / "prompts.txt").write_text("\n  \n")
    paths = {
        "missing": str(tmp_path / "nope"),
        "empty": str(tmp_path / "empty"),
        "mismatch": mismatched_dir,
        "model": model_dir,
        "emptyfile": str(tmp_path / "prompts.txt"),
    }
    argv = [a.format(**paths) for a in argv]
    rc, _, err = run(capsys, argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("rgemma: error: ")
    assert re.search(pattern, err), err


def test_no_bundled_model_names_model_option(capsys):
    if (checkpoint.bundled_model_path() / "rgemma_config.json").is_file():
        pytest.skip("a bundled model is installed")
    rc, _, err = run(capsys, ["generate", "hi"])
    assert rc == 2 and "--model" in err and err.count("\n") == 1


def test_seed_out_of_range_names_the_option(capsys):
    for seed in ("99999999999999999999", "-1"):
        with pytest.raises(SystemExit) as e:
            main(["generate", "hi", "--seed", seed])
        assert e.value.code == 2
        assert "argument --seed: must be an int in [0, 2**63)" in capsys.readouterr().err


def test_model_os_error_names_the_option(capsys):
    if not os.path.exists("/dev/null") or os.name != "posix":
        pytest.skip("needs /dev/null")
    rc, _, err = run(capsys, ["generate", "hi", "--model", "/dev/null"])
    assert rc == 2 and err == "rgemma: error: --model /dev/null: Not a directory\n", err


def test_chat_help_unknown_command_and_system_with_load_state(
    capsys, monkeypatch, model_dir, tmp_path
):
    state = str(tmp_path / "h.state")
    set_stdin(monkeypatch, b"/help\n/frobnicate\nHello\n")
    argv = ["chat", "--model", model_dir, "--max-new-tokens", "4", "--save-state", state]
    rc, out, err = run(capsys, argv)
    assert rc == 0, err
    assert "/reset" in err and "/exit" in err and "/help" in err
    assert "unknown command /frobnicate (try /help)" in err
    ref = ChatSession(tiny_model(), tokenizer(), max_new_tokens=4)
    assert out == ref.send("Hello") + "\n"  # only one message reached the model

    set_stdin(monkeypatch, b"")
    argv = ["chat", "--model", model_dir, "--load-state", state, "--system", "x"]
    rc, out, err = run(capsys, argv)
    assert rc == 0 and "rgemma: warning: --system is ignored" in err, err


def test_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["generate", "--temperature", "abc"])
    assert e.value.code == 2
    for cmd in ("generate", "chat", "info"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        assert "examples:" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    from rgemma.cli import COMMANDS

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name, command in COMMANDS.items():
        assert f"{name} {command.help}" in out
    with pytest.raises(SystemExit) as e:
        main(["frobnicate", "--model", "x"])
    assert e.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------
# Subprocesses: the real entry points, no tracebacks
# ----------------------------------------------------------------------------------
def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RGEMMA_DEBUG"}
    env.update(PYTHONIOENCODING="utf-8", **extra)
    return env


def test_subprocess_python_m(model_dir, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "rgemma",
            "generate",
            "Hello world",
            "--model",
            model_dir,
            "--max-new-tokens",
            "7",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    expected = generate(tiny_model(), tokenizer(), "Hello world", max_new_tokens=7)[0]
    assert p.stdout == expected.text + "\n"

    missing = str(tmp_path / "nope")
    p = subprocess.run(
        [sys.executable, "-m", "rgemma", "info", "--model", missing],
        check=False,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "rgemma", "info", "--model", missing],
        check=False,
        capture_output=True,
        text=True,
        env=_env(RGEMMA_DEBUG="1"),
        timeout=120,
    )
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_console_script_and_stdin_bytes(model_dir):
    exe = shutil.which("rgemma") or str(Path(sys.executable).parent / "rgemma")
    if not os.path.exists(exe):
        pytest.skip("the rgemma console script is not installed")
    p = subprocess.run(
        [exe, "generate", "--file", "-", "--model", model_dir, "--max-new-tokens", "3"],
        input=b"ok \xc3\x28 line\n",
        check=False,
        capture_output=True,
        env=_env(),
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    assert b"replaced" in p.stderr and b"Traceback" not in p.stderr
    assert p.stdout.startswith("=== [1/1] ok \ufffd( line ===\n".encode())


def test_load_api(model_dir, mismatched_dir):
    from rgemma.errors import CheckpointError
    from rgemma.generation import load

    model, tok = load(model_dir)
    assert tok.vocab_size == model.config.vocab_size == 400
    model, tok = load(os.path.join(model_dir, "model.safetensors"))  # tokenizer beside it
    assert tok.path.name == "tokenizer.model"
    with pytest.raises(CheckpointError, match="400.*256"):
        load(mismatched_dir)


def test_chat_invalid_utf8_line_is_replaced(capsys, monkeypatch, model_dir):
    set_stdin(monkeypatch, b"Hi \xff there\n")
    rc, out, err = run(capsys, ["chat", "--model", model_dir, "--max-new-tokens", "5"])
    assert rc == 0
    assert "replaced" in err and err.count("\n") == 1
    ref = ChatSession(tiny_model(), tokenizer(), max_new_tokens=5)
    assert out == ref.send("Hi \ufffd there") + "\n"
