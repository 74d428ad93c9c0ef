"""`rgemma convert`, `rgemma.save_hf`, quantized checkpoints and Hub ids (issue 13).

HF transformers loads what `save_hf` writes as it loads Google's own directories:
logits equal rgemma's within the attention window (and everywhere with
`exact_window`), the same greedy tokens, and its tokenizer gives rgemma's ids.
Tiny random models with the bundled tokenizer (4,096 pieces, Gemma's special and
chat tokens); no network."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch
from oracle import random_model

import rgemma
from rgemma.checkpoint import load_model, save_hf, save_model
from rgemma.cli import main
from rgemma.config import GriffinConfig
from rgemma.errors import CheckpointError
from rgemma.quantization import quantize
from rgemma.tokenizer import BUNDLED_TOKENIZER_PATH, Tokenizer

WINDOW = 8
CFG = dataclasses.replace(
    GriffinConfig.preset("test-tiny"), vocab_size=4096, attention_window_size=WINDOW
)
TEXT = "It is a truth universally acknowledged, that a single man in possession of a good"


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=1, std=0.2)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(BUNDLED_TOKENIZER_PATH)


@pytest.fixture(scope="module")
def rgemma_dir(tmp_path_factory, model):
    d = tmp_path_factory.mktemp("src") / "tiny"
    save_model(model, d, tokenizer_path=BUNDLED_TOKENIZER_PATH)
    return d


def _logits(m, ids):
    with torch.no_grad():
        out = m(torch.tensor([ids]))
    return (out.logits if hasattr(out, "logits") else out[0])[0].float()


# ----------------------------------------------------------------------------------
# HF directories
# ----------------------------------------------------------------------------------
def test_hf_from_pretrained_logits_greedy_and_tokenizer(tmp_path, model, tok):
    transformers = pytest.importorskip("transformers")
    out = save_hf(model, tmp_path / "hf", BUNDLED_TOKENIZER_PATH, max_shard_size=20_000)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.model"} <= names
    assert {"tokenizer_config.json", "special_tokens_map.json"} <= names
    assert "model.safetensors.index.json" in names  # 20 kB shards: sharded
    assert sum(n.startswith("model-0") for n in names) > 1

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = tok.encode(TEXT)
    assert len(ids) > 2 * WINDOW
    ours, theirs = _logits(model, ids), _logits(hf, ids)
    # HF sees W keys, the official model W + 1: equal up to position W, not after.
    assert (ours[:WINDOW] - theirs[:WINDOW]).abs().max() <= 1e-4
    assert (ours[WINDOW:] - theirs[WINDOW:]).abs().max() > 1e-2

    exact = save_hf(model, tmp_path / "hf-exact", BUNDLED_TOKENIZER_PATH, exact_window=True)
    assert json.loads((exact / "config.json").read_text())["attention_window_size"] == WINDOW + 1
    hf_exact = transformers.AutoModelForCausalLM.from_pretrained(exact, dtype=torch.float32)
    assert (ours - _logits(hf_exact.eval(), ids)).abs().max() <= 1e-4
    assert load_model(exact).config == CFG  # rgemma reads its own window back

    prompt = tok.encode("Call me")
    mine = rgemma.generate(model, tok, "Call me", max_new_tokens=12).pop().token_ids
    g = hf_exact.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert g[0, len(prompt) :].tolist()[: len(mine)] == mine

    # load_model reads the sharded directory back, tensor for tensor
    back = load_model(out)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_hf_tokenizer_same_ids_as_rgemma(tmp_path, model, tok):
    transformers = pytest.importorskip("transformers")
    out = save_hf(model, tmp_path / "hf", BUNDLED_TOKENIZER_PATH)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    strings = [
        "Hello world",
        "",
        "  two  spaces, tabs\tand\n\nnewlines\n\n\n",
        "Ünïcödé and emoji 🎉, digits 1234567",
        "<start_of_turn>user\nWho is Mr. Darcy?<end_of_turn>\n<start_of_turn>model\n",
    ]
    for s in strings:
        assert hf_tok(s)["input_ids"] == tok.encode(s), s  # BOS first, no EOS
        assert hf_tok.decode(tok.encode(s)[1:]) == s == tok.decode(tok.encode(s))
    chats = [
        [{"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Who is Emma?"},
            {"role": "assistant", "content": "A heroine."},
            {"role": "user", "content": "And Mr. Knightley?"},
        ],
        [{"role": "system", "content": "Only a system turn."}],
    ]
    for chat in chats:
        for gen in (True, False):
            got = hf_tok.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            got = got["input_ids"] if hasattr(got, "keys") else got
            assert list(got) == tok.encode_chat(chat, add_generation_prompt=gen), chat
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == [tok.eos_id, tok.end_of_turn_id]


def test_save_hf_refuses_quantized_and_bad_shard_size(tmp_path, model):
    from rgemma.errors import ConfigError

    with pytest.raises(ConfigError, match="invalid size 'lots'"):
        save_hf(model, tmp_path / "x", max_shard_size="lots")
    q = quantize(random_model(CFG), "int8")
    with pytest.raises(CheckpointError, match="int8-quantized model in HF format"):
        save_hf(q, tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------------
# rgemma convert
# ----------------------------------------------------------------------------------
def run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_convert_hf_and_back(capsys, tmp_path, rgemma_dir, model):
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    rc, out, err = run(capsys, ["convert", str(rgemma_dir), str(hf_dir), "--to", "hf"])
    assert rc == 0, err
    assert "wrote" in out and (hf_dir / "tokenizer_config.json").is_file()
    rc, _, err = run(
        capsys, ["convert", str(hf_dir), str(back), "--to", "rgemma", "--dtype", "bfloat16"]
    )
    assert rc == 0, err
    loaded, loaded_tok = rgemma.load(back)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded_tok.vocab_size == 4096
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k


def test_convert_destination_rules(capsys, tmp_path, rgemma_dir):
    dst = tmp_path / "dst"
    assert run(capsys, ["convert", str(rgemma_dir), str(dst), "--to", "hf"])[0] == 0
    before = (dst / "config.json").read_text()
    rc, _, err = run(capsys, ["convert", str(rgemma_dir), str(dst), "--to", "hf"])
    assert rc == 2 and err.strip() == f"rgemma: error: DST {dst} exists; pass --force to replace it"
    assert (dst / "config.json").read_text() == before
    # --force replaces a checkpoint, even one of the other format
    rc, _, err = run(capsys, ["convert", str(rgemma_dir), str(dst), "--to", "rgemma", "--force"])
    assert rc == 0, err
    assert (dst / "rgemma_config.json").is_file() and not (dst / "config.json").exists()
    # ... but never a directory that is not a checkpoint
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "a.txt").write_text("keep me")
    rc, _, err = run(capsys, ["convert", str(rgemma_dir), str(keep), "--to", "hf", "--force"])
    assert rc == 2 and "not a checkpoint" in err and len(err.strip().splitlines()) == 1
    assert (keep / "a.txt").read_text() == "keep me"
    rc, _, err = run(capsys, ["convert", str(rgemma_dir), str(tmp_path / "q"), "--to", "hf",
                              "--quantize", "int8"])  # fmt: skip
    assert rc == 2 and "--quantize needs --to rgemma" in err


def test_convert_is_never_half_written(capsys, tmp_path, rgemma_dir, monkeypatch):
    import safetensors.torch

    dst = tmp_path / "dst"

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    rc, _, err = run(capsys, ["convert", str(rgemma_dir), str(dst), "--to", "hf"])
    assert rc == 2 and "disk full" in err
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_quantized_save_load_identical_logits(capsys, tmp_path, rgemma_dir, model, tok):
    q = quantize(random_model(CFG, seed=1, std=0.2), "int8")
    save_model(q, tmp_path / "q", tokenizer_path=BUNDLED_TOKENIZER_PATH)
    meta = json.loads((tmp_path / "q" / "rgemma_config.json").read_text())
    assert meta["quantization"] == "int8"

    def no_requantizing(*args, **kwargs):
        raise AssertionError("loading must not quantize the weights again")

    loaded = load_model(tmp_path / "q")
    assert loaded.quantization == "int8"
    ids = tok.encode(TEXT)
    assert torch.equal(_logits(loaded, ids), _logits(q, ids))
    for k, v in q.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k

    # the CLI: --quantize int8 writes the same int8 checkpoint
    rc, _, err = run(
        capsys,
        ["convert", str(rgemma_dir), str(tmp_path / "cq"), "--to", "rgemma", "--quantize", "int8"],
    )
    assert rc == 0, err
    import rgemma.quantization as quantization_module

    original = quantization_module.quantize_per_channel
    try:  # the rebuild runs on the meta device: no real tensor is quantized
        quantization_module.quantize_per_channel = lambda w: (
            original(w) if w.is_meta else no_requantizing()
        )
        cq = load_model(tmp_path / "cq")
    finally:
        quantization_module.quantize_per_channel = original
    assert torch.equal(_logits(cq, ids), _logits(q, ids))
    with pytest.raises(rgemma.ConfigError, match="int8-quantized .* cannot be loaded as"):
        load_model(tmp_path / "cq", dtype="bfloat16")


# ----------------------------------------------------------------------------------
# Hub ids
# ----------------------------------------------------------------------------------
def _fake_cache(root, repo_id, src_dir, revision="abc123"):
    """A Hugging Face cache holding `src_dir`'s files as `repo_id`'s snapshot."""
    import shutil

    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in src_dir.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap


def test_hub_id_resolves_from_the_local_cache(capsys, tmp_path, monkeypatch, model):
    from rgemma.hub import cached_snapshot, hub_cache_dir, resolve_model_path

    hf_dir = save_hf(model, tmp_path / "hf", BUNDLED_TOKENIZER_PATH)
    cache = tmp_path / "cache"
    snap = _fake_cache(cache, "google/recurrentgemma-tiny-it", hf_dir)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("google/recurrentgemma-tiny-it") == snap
    assert cached_snapshot("google/recurrentgemma-tiny-it", "abc123") == snap  # by commit
    assert resolve_model_path("google/recurrentgemma-tiny-it@abc123") == snap
    assert resolve_model_path(str(hf_dir)) == str(hf_dir)  # local paths pass through

    loaded, loaded_tok = rgemma.load("google/recurrentgemma-tiny-it")
    assert loaded.source["path"] == str(snap) and loaded_tok.vocab_size == 4096
    ids = Tokenizer(BUNDLED_TOKENIZER_PATH).encode(TEXT)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    rc, out, err = run(capsys, ["info", "--model", "google/recurrentgemma-tiny-it"])
    assert rc == 0 and str(snap) in out, err


def test_hub_id_not_cached_is_one_line_error(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run(capsys, ["info", "--model", "google/recurrentgemma-2b-it"])
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "models--google--recurrentgemma-2b-it" in err and "HF_HUB_OFFLINE" in err
    assert "huggingface-cli download google/recurrentgemma-2b-it" in err

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(CheckpointError, match="install huggingface_hub"):
        load_model("google/recurrentgemma-2b-it")

    monkeypatch.delitem(sys.modules, "huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    with pytest.raises(CheckpointError, match="downloading it failed: network is unreachable"):
        load_model("google/recurrentgemma-2b-it")


# ----------------------------------------------------------------------------------
# Official Flax checkpoints (orbax)
# ----------------------------------------------------------------------------------
def test_flax_orbax_checkpoint_equals_official_jax(tmp_path):
    """Tiny random parameters in the official JAX package's own structure, saved
    with orbax as the Kaggle JAX checkpoints are: same logits as the official JAX
    model; a missing array is named."""
    jax = pytest.importorskip("jax")
    rg = pytest.importorskip("recurrentgemma.jax")
    ocp = pytest.importorskip("orbax.checkpoint")
    import numpy as np

    tiny = GriffinConfig.preset("test-tiny")
    kinds = {
        "recurrent": rg.TemporalBlockType.RECURRENT,
        "attention": rg.TemporalBlockType.ATTENTION,
    }
    jcfg = rg.GriffinConfig(
        vocab_size=tiny.vocab_size,
        width=tiny.width,
        mlp_expanded_width=tiny.mlp_expanded_width,
        num_heads=tiny.num_heads,
        lru_width=tiny.lru_width,
        block_types=tuple(kinds[b.value] for b in tiny.block_types),
        attention_window_size=tiny.attention_window_size,
        embeddings_scale_by_sqrt_dim=True,
        logits_soft_cap=30.0,
    )
    jmodel = rg.Griffin(jcfg)
    jnp = jax.numpy
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, tiny.vocab_size, (1, 3 * WINDOW)))
    pos = jnp.arange(tokens.shape[1])[None]
    params = jmodel.init(jax.random.PRNGKey(0), tokens, pos)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree_util.tree_unflatten(  # every parameter matters: N(0, 0.2)
        tree, [0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )
    ckpt = tmp_path / "2b"
    ocp.PyTreeCheckpointer().save(str(ckpt), params)
    expected, _ = jmodel.apply({"params": params}, tokens, pos)

    ours = load_model(ckpt, config=tiny)  # the window is not in the arrays: declare it
    assert ours.source["format"] == "flax" and ours.config == tiny
    got = _logits(ours, np.asarray(tokens[0]).tolist())
    assert np.abs(np.asarray(expected[0]) - got.numpy()).max() <= 1e-4

    broken = dict(params)
    block = dict(broken["blocks.0"])
    block["recurrent_block"] = {k: v for k, v in block["recurrent_block"].items() if k != "conv_1d"}
    broken["blocks.0"] = block
    ocp.PyTreeCheckpointer().save(str(tmp_path / "broken"), broken)
    with pytest.raises(
        CheckpointError, match=r"broken: .*'blocks\.0\.recurrent_block\.conv_1d\.w' is missing"
    ):
        load_model(tmp_path / "broken", config=tiny)
