"""The error types every layer raises; the CLI prints their message as one line and exits 2.

    UserError      bad input from the user (a file, an id, a value)
    DataError      a bad REFER record or file (a UserError); ``l2l_ray.data.images.ImageError`` is one
    ConfigError    a bad config file, key or value (defined in ``l2l_ray.config``, re-exported here)

This module imports nothing of l2l_ray but ``config`` (which imports nothing of l2l_ray), so the
data, model, selection and priors layers raise these without importing the command line.
"""

from __future__ import annotations

from l2l_ray.config import ConfigError


class UserError(Exception):
    """Bad input from the user (file, id, value): printed as one line, exit code 2."""


class DataError(UserError):
    """A bad REFER record or file; the message names the file / ref id / sentence id."""


# What the CLI reports as a message alone (no traceback), exit code 2. FileNotFoundError: a path the
# user gave does not exist (the messages name it and say what belongs there).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ConfigError, FileNotFoundError)

__all__ = ["USER_ERRORS", "ConfigError", "DataError", "UserError"]
