"""Hugging Face Hub ids: `google/recurrentgemma-2b-it` -> a local checkpoint directory.

`resolve_model_path(path)` lets every `--model` and `rgemma.load(...)` take a Hub id:

1. a path that exists locally is used as it is (a local `google/x` directory wins);
2. an id `ORG/NAME` (optionally `ORG/NAME@REVISION`) is looked up in the local
   Hugging Face cache, the layout `huggingface_hub` writes:
   `<cache>/models--ORG--NAME/refs/<revision>` holds a commit hash and
   `<cache>/models--ORG--NAME/snapshots/<hash>/` the files. The cache is
   `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
   else `~/.cache/huggingface/hub`;
3. otherwise, if `huggingface_hub` is installed and `HF_HUB_OFFLINE` is not set, the
   checkpoint's config, safetensors and tokenizer are downloaded into that cache
   (with `huggingface_hub`'s progress bars; gated models such as Google's need
   `huggingface-cli login` after accepting the licence on the model's page);
4. else a one-line `CheckpointError` says where it looked and how to get the weights.

No network access happens in steps 1 and 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import CheckpointError

__all__ = ["cached_snapshot", "hub_cache_dir", "is_hub_id", "resolve_model_path"]

_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*)/([A-Za-z0-9][\w.-]*)(?:@([\w./-]+))?$")

#: Files a checkpoint download fetches (not the .gguf / .bin / Flax duplicates).
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model")


def is_hub_id(path: str | os.PathLike | None) -> bool:
    """Whether `path` reads as a Hub id `ORG/NAME[@REVISION]` and is not a local path."""
    if path is None or not isinstance(path, str) or os.path.exists(path):
        return False
    return _HUB_ID.match(path) is not None and not path.startswith((".", "~"))


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache directory (see the module docstring for the order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path("~/.cache").expanduser()
    return base / "huggingface" / "hub"


def _repo_dir(repo_id: str, cache_dir: Path) -> Path:
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def cached_snapshot(
    repo_id: str, revision: str = "main", cache_dir: str | os.PathLike | None = None
) -> Path | None:
    """The cached snapshot directory of `repo_id` at `revision`, or None.

    `revision` is a branch or tag (resolved through `refs/<revision>`) or a commit
    hash (`snapshots/<hash>`). A snapshot counts only if it holds a `config.json`
    or a weights file.
    """
    repo = _repo_dir(repo_id, Path(cache_dir) if cache_dir else hub_cache_dir())
    candidates = [repo / "snapshots" / revision]
    ref = repo / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        candidates.insert(0, repo / "snapshots" / commit)
    for snap in candidates:
        if snap.is_dir() and any(
            (snap / name).exists()
            for name in ("config.json", "model.safetensors", "model.safetensors.index.json")
        ):
            return snap
    return None


def _download(repo_id: str, revision: str, cache_dir: Path) -> Path:
    """`huggingface_hub.snapshot_download` of the checkpoint files; raises
    CheckpointError with the reason on one line."""
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=str(cache_dir),
                allow_patterns=list(DOWNLOAD_PATTERNS),
            )
        )
    except Exception as err:  # noqa: BLE001 (network, auth, missing repo: all one line)
        reason = " ".join((str(err) or type(err).__name__).split())[:300]
        raise CheckpointError(
            f"{repo_id} is not in the Hugging Face cache ({_repo_dir(repo_id, cache_dir)}) "
            f"and downloading it failed: {reason}. Download it with `huggingface-cli download "
            f"{repo_id}` (after accepting its licence on huggingface.co and `huggingface-cli "
            "login`), or pass a local directory"
        ) from None


def resolve_model_path(path: str | os.PathLike | None) -> str | os.PathLike | None:
    """`path` itself, unless it is a Hub id: then its local snapshot directory.

    Args:
        path: a local file or directory, a Hub id `ORG/NAME[@REVISION]`, or None
            (returned as is: the bundled model).

    Returns:
        `path` unchanged, or the snapshot directory (a `Path`) of the Hub id.

    Raises:
        CheckpointError: a Hub id that is not in the cache and cannot be downloaded
            (`huggingface_hub` missing, `HF_HUB_OFFLINE` set, or no network): the
            message names the cache directory and how to get the weights.
    """
    if not is_hub_id(path):
        return path
    org, name, revision = _HUB_ID.match(str(path)).groups()
    repo_id, revision = f"{org}/{name}", revision or "main"
    cache = hub_cache_dir()
    found = cached_snapshot(repo_id, revision, cache)
    if found is not None:
        return found
    where = _repo_dir(repo_id, cache)
    how = (
        f"download it with `huggingface-cli download {repo_id}` (after accepting its "
        "licence on huggingface.co and `huggingface-cli login`), set HF_HUB_CACHE to the "
        "cache that has it, or pass a local directory"
    )
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CheckpointError(
            f"{path} is neither a local path nor in the Hugging Face cache (looked in "
            f"{where}); install huggingface_hub (`pip install huggingface_hub`) to download "
            f"it, or {how}"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        raise CheckpointError(
            f"{path} is neither a local path nor in the Hugging Face cache (looked in "
            f"{where}) and HF_HUB_OFFLINE is set; {how}"
        )
    return _download(repo_id, revision, cache)
