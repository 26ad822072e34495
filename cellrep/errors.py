"""Errors that cellrep reports to a user as one clear line (exit code 2 from the CLI)."""


class CellrepError(Exception):
  """Base class of errors caused by input or configuration, not by a bug."""


class _Named(CellrepError):
  """"<what>: <problem> (expected <expected>)": `problem` and `expected` kept for re-raising."""

  def __init__(self, what: str, problem: str, expected: str | None = None):
    self.problem = problem
    self.expected = expected
    super().__init__(f"{what}: {problem}" + (f" (expected {expected})" if expected else ""))


class InputError(_Named):
  """Bad input data: names the file, the field and what was expected."""

  def __init__(self, path, problem: str, expected: str | None = None):
    self.path = str(path)
    super().__init__(self.path, problem, expected)


class ConfigError(_Named):
  """A configuration value that cannot work: names the key and what was expected."""

  def __init__(self, key: str, problem: str, expected: str | None = None):
    self.key = key
    super().__init__(f"config.{key}", problem, expected)


class BadValue(_Named, ValueError):
  """A value a library function cannot work with, named in the library's own terms.

  `field` is the argument or field that holds it (``width``, ``val_fovs``,
  ``blur_ksize``); a task re-raises it as the `ConfigError` of the config key that
  set it (`cellrep.config_util.config_keys`). A ValueError too, so code that calls
  the library directly may catch it as one.
  """

  def __init__(self, field: str, problem: str, expected: str | None = None):
    self.field = field
    super().__init__(field, problem, expected)


class NonFiniteLossError(CellrepError):
  """Training produced a NaN or Inf loss; the last good checkpoint is kept."""
