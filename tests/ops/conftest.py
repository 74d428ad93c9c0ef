"""Shared by tests/ops: the tolerance table and the comparison helper.

Every fast implementation is compared with its reference on cloned inputs. float32
implementations differ from the reference only in the order of float32 operations;
bfloat16 ones also in where results are rounded to bfloat16 (about 3 significant
digits), so their tolerances are bfloat16 steps.
"""

import pytest
import torch

#: {input dtype: {"out" or "grad": assert_close tolerances}}.
TOLERANCES = {
    torch.float32: {"out": {"rtol": 1e-5, "atol": 1e-5}, "grad": {"rtol": 1e-4, "atol": 1e-5}},
    # mamba's tests/ops bfloat16 tolerance: a result that cancels (terms of size ~4
    # summing to ~0) keeps the absolute error of the terms' bfloat16 rounding.
    torch.bfloat16: {"out": {"rtol": 3e-2, "atol": 5e-2}, "grad": {"rtol": 5e-2, "atol": 5e-2}},
}


@pytest.fixture
def assert_close():
    """`assert_close(actual, expected, dtype, kind="out", what="")` with the table's
    tolerance for inputs of `dtype`; both sides compared in float32."""

    def check(actual, expected, dtype, kind="out", what=""):
        assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
        torch.testing.assert_close(
            actual.float(),
            expected.float(),
            **TOLERANCES[dtype][kind],
            msg=lambda m: f"{what}: {m}",
        )

    return check


@pytest.fixture(autouse=True)
def _auto_ops(monkeypatch):
    """Every test starts from the automatic choices (no RGEMMA_OPS, no `use`)."""
    from rgemma import ops

    monkeypatch.delenv("RGEMMA_OPS", raising=False)
    ops.reset()
    yield
    ops.reset()
