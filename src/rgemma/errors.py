"""Exceptions raised by rgemma. Every one is a `ValueError` subclass whose message
names the offending file, key, shape or value, so callers (and the CLI) can show it
as a one-line error."""


class RgemmaError(ValueError):
    """Base class of rgemma's errors."""


class ConfigError(RgemmaError):
    """An invalid `GriffinConfig`, or one that does not match a checkpoint."""


class CheckpointError(RgemmaError):
    """A checkpoint that cannot be read: missing/unexpected key, wrong shape,
    truncated or non-checkpoint file, directory without a checkpoint."""


class InputError(RgemmaError):
    """Invalid model input: tokens out of range, segment_pos of the wrong shape,
    a state from another config or batch size, bad generation parameters."""
