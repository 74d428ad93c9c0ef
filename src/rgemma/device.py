"""Choosing and checking a torch device, for the CLI (`--device`) and training
(`TrainConfig.device`) alike."""

from __future__ import annotations

import torch

from .errors import InputError, RgemmaError


def resolve_device(
    name: str | torch.device,
    *,
    what: str = "device",
    error: type[RgemmaError] = InputError,
) -> torch.device:
    """The `torch.device` for `name`, checked to be usable here.

    Args:
        name: "auto" (CUDA when available, else CPU), or any `torch.device` string
            ("cpu", "cuda", "cuda:1", ...).
        what: how the caller names the setting in messages ("--device",
            "TrainConfig.device").
        error: the `RgemmaError` subclass to raise.

    Raises:
        `error`: an invalid name, the meta device (it holds no data), CUDA where it is
            not available, or a device this torch build cannot use (mps, xla, ...).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise error(f"invalid {what} {name!r}: {err}") from None
    if device.type == "meta":
        raise error(f"{what} meta holds no data: choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        why = (
            f"this torch build ({torch.__version__}) has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES)"
        )
        raise error(f"{what} {name}: CUDA is not available on this machine: {why}")
    try:  # e.g. mps or xla on a build without them
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        why = str(err).strip().splitlines()[0].split(". ")[0][:160] if str(err).strip() else ""
        raise error(f"{what} {name}: this torch build cannot use it ({why})") from None
    return device
