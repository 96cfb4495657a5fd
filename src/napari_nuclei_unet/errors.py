"""Exceptions whose message is a complete one-line explanation for the user.

The CLI prints ``str(error)`` of these and exits; the widgets show it as a notification.
Messages name the file (and row, where there is one) and the problem.
"""


class NucleiUnetError(Exception):
    """Base class: an expected failure with a user-facing message."""


class InputError(NucleiUnetError):
    """An image or label file that can't be read or doesn't make sense."""


class RLEError(InputError):
    """A malformed run-length encoding or RLE CSV."""


class ModelError(NucleiUnetError):
    """Weights or checkpoints that can't be loaded."""


class Cancelled(NucleiUnetError):
    """Long work stopped at the user's request."""
