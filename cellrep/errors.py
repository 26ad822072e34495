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


class NonFiniteLossError(CellrepError):
  """Training produced a NaN or Inf loss; the last good checkpoint is kept."""
