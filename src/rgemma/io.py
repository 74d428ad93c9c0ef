"""Small file helpers: atomic writes (temp file in the same directory, fsync, rename).

Every file and directory these helpers put in place gets the mode a plain `open(...,
"w")` / `os.mkdir` would give it under the process umask (0644 / 0755 for umask
022), whatever the writer inside made: `tempfile` creates 0600 / 0700, and
safetensors' `save_file` writes its files 0600. So weights, states and training
checkpoints get the same permissions as the JSON files beside them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator


def _umask() -> int:
    """The process umask. Read from /proc where it can be: setting it to read it back
    (`os.umask`) would, for a moment, give files other threads create mode 0666."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _file_mode() -> int:
    """Mode of a new file under the current umask (0o644 for umask 022)."""
    return 0o666 & ~_umask()


def _dir_mode() -> int:
    """Mode of a new directory under the current umask (0o755 for umask 022)."""
    return 0o777 & ~_umask()


def _set_modes(root: str) -> None:
    """Give `root` and everything under it the umask modes (files keep their
    execute bits out: rgemma writes none)."""
    os.chmod(root, _dir_mode())
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(parent, name), _dir_mode())
        for name in files:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, _file_mode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one
    `os.replace`, so readers see either the old file or the whole new one, with the
    umask's file mode (see the module docstring) even if the writer recreated it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=directory)
    os.close(fd)
    os.chmod(tmp, _file_mode())  # mkstemp makes 0600; give the usual file mode
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())  # the writer may have made a new 0600 file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary directory beside `path`; on success it takes `path`'s place
    (an existing `path` is moved aside first and removed after the swap). Everything
    written inside gets the umask's modes (see the module docstring)."""
    import shutil

    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=parent)
    os.chmod(tmp, _dir_mode())  # mkdtemp makes 0700; give the usual directory mode
    try:
        yield tmp
        _set_modes(tmp)  # safetensors writes 0600 files
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + ".", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
