"""The errors tgd-jax raises for a user to act on; everything else is a bug.

* :class:`UsageError` - the input is wrong (an argument, a config field, a file, a flag); the
  message names it. Subclasses: :class:`ConfigError` (a config field or an option of the
  API), :class:`DataError` (a dataset, volume or ROI). A ``ValueError`` too, so code that
  catches ``ValueError`` around a call keeps working.
* :class:`RunError` - something failed while running (a non-finite loss, a damaged
  checkpoint, a write that failed); the message says what was kept.
* :class:`TGDWarning` - a call that is valid but most likely not what was meant (a plan
  that retrains nothing, BatchNorm statistics left out of a plan); one line saying what to
  pass instead.

Commands report these (and a user's missing file) as one line
(:func:`tgd_jax.io.errors.reported`); any other exception, a ``ValueError`` from JAX or
Flax included, keeps its traceback and is reported as a bug.
"""

from __future__ import annotations

__all__ = ["TGDError", "UsageError", "ConfigError", "DataError", "RunError", "TGDWarning"]


class TGDError(Exception):
    """Base of every error tgd-jax reports to a user as one line."""


class UsageError(TGDError, ValueError):
    """The input is wrong: the message names the flag, field, file, key or value."""


class ConfigError(UsageError):
    """A config field or an API option is invalid (its name and value are in the message)."""


class DataError(UsageError):
    """A dataset, volume or ROI is missing, malformed or inconsistent (the message says
    where)."""


class RunError(TGDError):
    """Something failed while running; the message says what, and what was kept."""


class TGDWarning(UserWarning):
    """A valid call whose outcome is most likely not what was meant; the message says what
    happens and what to pass instead.

    Example:
      >>> import warnings
      >>> with warnings.catch_warnings(record=True) as caught:
      ...     warnings.simplefilter("always")
      ...     warnings.warn("phi=0 retrains nothing", TGDWarning)
      >>> caught[0].category.__name__
      'TGDWarning'
    """
