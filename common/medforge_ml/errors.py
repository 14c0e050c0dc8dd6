"""The failure every ML step reports the same way: a one-line reason a hospital or a forge can
act on. The trainer and the merger turn it into their termination message."""


class ModelError(Exception):
    """A model, a file or a setting that cannot be used; the message says which and why."""
