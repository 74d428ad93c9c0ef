"""Every ```python block of README.md runs as written, on the bundled model.

A block whose text contains the marker comment `# not run by tests` is skipped (it
needs a running server or the network); the README says so beside its first
example. Each block runs alone, in a fresh namespace, in a temporary directory (for
the files it writes), so none depends on another.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARKER = "# not run by tests"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of each ```python block of README.md."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


BLOCKS = python_blocks()


def test_readme_has_runnable_python_blocks():
    assert len(BLOCKS) >= 3
    assert sum(SKIP_MARKER not in code for _, code in BLOCKS) >= 2
    assert f"`{SKIP_MARKER}`" in README.read_text(encoding="utf-8")  # the marker is documented


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, tmp_path, monkeypatch):
    if SKIP_MARKER in code:
        pytest.skip(f"README.md line {line} is marked '{SKIP_MARKER}'")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the bundled model is small: one thread is fastest
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code_object = compile(code, f"README.md:{line}", "exec")
            exec(code_object, {"__name__": "__readme__"})  # noqa: S102 (the README's own code)
    finally:
        torch.set_num_threads(threads)
    assert out.getvalue() or list(tmp_path.iterdir())  # it printed or wrote something
