"""The trainer's failures: each one becomes a one-line reason in the termination message."""

from medforge_ml.errors import ModelError


class TrainFailed(ModelError):
    """A failure with a reason a hospital's operator can act on (exit code 1)."""


class ConfigError(TrainFailed):
    """A job config that cannot be used; the message names the field (exit code 2)."""
