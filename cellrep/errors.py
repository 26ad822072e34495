"""Errors that cellrep reports to a user as one clear line (exit code 2 from the CLI)."""


class CellrepError(Exception):
  """Base class of errors caused by input or configuration, not by a bug."""


class InputError(CellrepError):
  """Bad input data: names the file, the field and what was expected."""

  def __init__(self, path, problem: str, expected: str | None = None):
    self.path = str(path)
    self.problem = problem
    self.expected = expected
    message = f"{self.path}: {problem}"
    if expected:
      message += f" (expected {expected})"
    super().__init__(message)


class ConfigError(CellrepError):
  """A configuration value that cannot work: names the key and what was expected."""

  def __init__(self, key: str, problem: str, expected: str | None = None):
    self.key = key
    message = f"config.{key}: {problem}"
    if expected:
      message += f" (expected {expected})"
    super().__init__(message)


class BadValue(CellrepError, ValueError):
  """A value a library function cannot work with, named in the library's own terms.

  `field` is the argument or field that holds it (``width``, ``val_fovs``,
  ``blur_ksize``); a task re-raises it as the `ConfigError` of the config key that
  set it (`cellrep.config_util.config_keys`). A ValueError too, so code that calls
  the library directly may catch it as one.
  """

  def __init__(self, field: str, problem: str, expected: str | None = None):
    self.field = field
    self.problem = problem
    self.expected = expected
    message = f"{field}: {problem}"
    if expected:
      message += f" (expected {expected})"
    super().__init__(message)


class NonFiniteLossError(CellrepError):
  """Training produced a NaN or Inf loss; the last good checkpoint is kept."""
