"""Helpers for config files: `:arg` strings and checks of values a type check cannot catch."""

from __future__ import annotations

import ml_collections

from cellrep.errors import ConfigError


def _parse_value(text: str, like):
  if isinstance(like, bool):
    if text.lower() in ("1", "true", "yes"):
      return True
    if text.lower() in ("0", "false", "no"):
      return False
    raise ValueError(f"{text!r} is not a boolean")
  if like is None:
    return text
  return type(like)(text)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses a config's `:arg` ("runlocal,members=3") into typed values.

  A bare word sets a boolean default to True; `key=value` is converted to the
  type of the default. Unknown keys are errors.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  for part in filter(None, (arg or "").split(",")):
    key, eq, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigError(f":{key}", "unknown config argument", f"one of {sorted(defaults)}")
    try:
      out[key] = _parse_value(value.strip(), defaults[key]) if eq else True
    except ValueError as e:
      raise ConfigError(f":{key}", str(e), f"a {type(defaults[key]).__name__}") from None
  return out


def check(condition: bool, key: str, problem: str, expected: str) -> None:
  """Raises ConfigError(key, problem, expected) unless `condition`."""
  if not condition:
    raise ConfigError(key, problem, expected)


def check_choice(config, key: str, choices) -> None:
  value = config
  for part in key.split("."):
    value = value[part]
  check(value in choices, key, f"{value!r} is not a known choice", f"one of {list(choices)}")
