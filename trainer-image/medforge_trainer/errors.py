"""The trainer's failures: each one becomes a one-line reason in the termination message."""


class TrainFailed(Exception):
    """A failure with a reason a hospital's operator can act on (exit code 1)."""


class ConfigError(TrainFailed):
    """A job config that cannot be used; the message names the field (exit code 2)."""
