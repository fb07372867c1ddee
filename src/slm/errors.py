"""Errors a user can cause and fix. The CLI prints them as one line, never as a traceback."""


class SlmError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and how to fix it."""


class ConfigError(SlmError):
    """A bad config value: the message starts with the dotted key, e.g. ``model.n_heads``."""


class DataError(SlmError):
    """Missing, corrupt or mismatched data files."""


class CheckpointError(SlmError):
    """A checkpoint that cannot be read or does not fit the model."""


class TrainingDiverged(SlmError):
    """Too many steps in a row with a non-finite loss or gradient."""
