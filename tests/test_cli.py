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
            "--temperature",
            "0",
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
    argv = [
        "generate",
        "Hello world",
        "--model",
        model_dir,
        "--max-new-tokens",
        "10",
        "--temperature",
        "0",
    ]
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
            "--temperature",
            "0",
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
        [
            "generate",
            "-",
            "--model",
            model_dir,
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
            "--verbose",
            "--chat",
        ],
    )
    assert rc == 0
    lines = err.strip().splitlines()
    # --verbose also names each op's kernel and the per-machine measured choices.
    kernels = [line for line in lines if line.startswith("kernels: ")]
    assert len(kernels) == 1 and "linear, 1 row, float32 (" in kernels[0]
    lines = [line for line in lines if not line.startswith("kernels: ")]
    # ... and the thread count, the OpenMP wait policy and the sampling parameters.
    setup = [line for line in lines if line.startswith("threads: ")]
    assert len(setup) == 1 and "OMP_WAIT_POLICY" in setup[0] and "temperature=0.0" in setup[0]
    lines = [line for line in lines if not line.startswith("threads: ")]
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
            "--temperature",
            "0",
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
        capsys,
        [
            "chat",
            "--model",
            model_dir,
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--load-state",
            state,
        ],
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
        capsys,
        [
            "chat",
            "--model",
            model_dir,
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--save-state",
            state,
        ],
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
    argv = [
        "chat",
        "--model",
        model_dir,
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--save-state",
        state,
    ]
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
            "--temperature",
            "0",
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
    # The inference commands set OMP_WAIT_POLICY=PASSIVE before torch loads, unless set.
    argv = [sys.executable, "-m", "rgemma", "generate", "Hi", "--model", model_dir]
    argv += ["--max-new-tokens", "2", "--verbose"]
    env = _env()
    env.pop("OMP_WAIT_POLICY", None)
    p = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "OMP_WAIT_POLICY=PASSIVE (rgemma's default" in p.stderr
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    p = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0 and "OMP_WAIT_POLICY=ACTIVE (set by the user)" in p.stderr

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
        [
            exe,
            "generate",
            "--file",
            "-",
            "--model",
            model_dir,
            "--max-new-tokens",
            "3",
            "--temperature",
            "0",
        ],
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
    rc, out, err = run(
        capsys, ["chat", "--model", model_dir, "--max-new-tokens", "5", "--temperature", "0"]
    )
    assert rc == 0
    assert "replaced" in err and err.count("\n") == 1
    ref = ChatSession(tiny_model(), tokenizer(), max_new_tokens=5)
    assert out == ref.send("Hi \ufffd there") + "\n"


# ----------------------------------------------------------------------------------
# Sampling defaults and the logits-processor options
# ----------------------------------------------------------------------------------
def test_generate_defaults_sample_and_are_shown_in_help(capsys, model_dir):
    from rgemma.defaults import SAMPLING
    from rgemma.sampling import default_sampling

    argv = ["generate", "Hello", "--model", model_dir, "--max-new-tokens", "8", "--seed", "5"]
    rc, out, err = run(capsys, argv)
    assert rc == 0, err
    want = generate(
        tiny_model(), tokenizer(), "Hello", sampling=default_sampling(max_new_tokens=8, seed=5)
    )[0]
    assert out == want.text + "\n"
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default {SAMPLING['temperature']:g})" in text and "0 = greedy" in text
    assert f"(default {SAMPLING['top_p']:g})" in text
    assert f"(default {SAMPLING['repetition_penalty']:g} when sampling" in text
    for option in ("--presence-penalty", "--frequency-penalty", "--logit-bias", "--min-tokens"):
        assert option in text
    assert "--ignore-eos" in text


def test_generate_logits_processor_options(capsys, model_dir):
    argv = ["generate", "Hello", "--model", model_dir, "--max-new-tokens", "8"]
    argv += ["--temperature", "0", "--repetition-penalty", "1.3", "--frequency-penalty", "0.5"]
    argv += ["--presence-penalty", "0.25", "--logit-bias", "77=4", "--logit-bias", "20=-100"]
    argv += ["--min-tokens", "3", "--ignore-eos"]
    rc, out, err = run(capsys, argv)
    assert rc == 0, err
    want = generate(
        tiny_model(),
        tokenizer(),
        "Hello",
        max_new_tokens=8,
        repetition_penalty=1.3,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        logit_bias={77: 4.0, 20: -100.0},
        min_tokens=3,
        ignore_eos=True,
    )[0]
    assert out == want.text + "\n" and len(want.token_ids) == 8


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--repetition-penalty", "0"], "^rgemma: error: --repetition-penalty must be"),
        (["--presence-penalty", "3"], "^rgemma: error: --presence-penalty must be"),
        (["--min-tokens", "9"], "^rgemma: error: --min-tokens .*9.* must not exceed"),
        (["--logit-bias", "77"], "--logit-bias: expected ID=BIAS"),
        (["--logit-bias", "77=500"], "--logit-bias: expected ID=BIAS"),
        (["--logit-bias", "5000=1"], "^rgemma: error: logit_bias token id 5000 is outside"),
    ],
)
def test_logits_processor_option_errors_are_one_line(capsys, model_dir, extra, pattern):
    import re

    argv = ["generate", "Hello", "--model", model_dir, "--max-new-tokens", "8", *extra]
    try:
        rc = main(argv)
    except SystemExit as exit:  # argparse's usage error
        rc = exit.code
    err = capsys.readouterr().err
    assert rc == 2 and re.search(pattern, err, re.MULTILINE), err
    assert "Traceback" not in err


def test_chat_ctrl_c_during_a_reply_keeps_the_conversation(capsys, monkeypatch, model_dir):
    """Ctrl-C while a reply streams stops it and returns to the prompt; the session
    keeps only complete turns, so the next reply is that of a fresh conversation."""
    original = ChatSession.send_stream
    sessions = []

    def interrupted_once(self, text):
        sessions.append(self)
        stream = original(self, text)
        if len(sessions) > 1:
            return stream

        def pieces():
            yield next(stream)
            raise KeyboardInterrupt

        return pieces()

    monkeypatch.setattr(ChatSession, "send_stream", interrupted_once)
    set_stdin(monkeypatch, b"Hello\nHi there\n")
    argv = ["chat", "--model", model_dir, "--max-new-tokens", "6", "--temperature", "0"]
    rc, out, err = run(capsys, argv)
    assert rc == 0, err
    assert "reply stopped" in err and "Traceback" not in err
    ref = ChatSession(tiny_model(), tokenizer(), max_new_tokens=6)
    assert out.endswith("\n" + ref.send("Hi there") + "\n")
    assert sessions[-1].turns == 1 and sessions[-1].messages[0]["content"] == "Hi there"


def test_serve_default_max_tokens_options_are_checked(capsys):
    rc = main(["serve", "--max-tokens", "100", "--max-tokens-default", "200", "--model", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "--max-tokens-default (200) must not exceed --max-tokens (100)" in err
