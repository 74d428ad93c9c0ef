"""The tree is `ruff format`ted and `ruff check` clean (ruff is pinned in the test extra)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["src", "tests", "benchmarks", "scripts"]


def _ruff() -> str:
    exe = shutil.which("ruff")
    if exe is None:
        pytest.skip("ruff is not installed (it is in the test extra: pip install -e '.[test]')")
    return exe


@pytest.mark.parametrize("args", [["format", "--check"], ["check"]], ids=["format", "check"])
def test_ruff_clean(args):
    result = subprocess.run(
        [_ruff(), *args, *PATHS], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"ruff {' '.join(args)} found problems:\n{result.stdout}"
