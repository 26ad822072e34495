"""Helpers for config files: `:arg` strings and checks of values a type check cannot catch."""

from __future__ import annotations

import contextlib

import ml_collections

from cellrep.errors import BadValue, ConfigError


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


@contextlib.contextmanager
def config_keys(prefix: str = "", **keys: str):
  """Re-raises a library's `BadValue` as the `ConfigError` of the config key that set it:
  ``keys[field]`` when given, else ``prefix.field`` (just ``field`` without a prefix).

    with config_keys("augment"):           # BadValue("blur_ksize") -> config.augment.blur_ksize
      AugmentConfig(**config.augment)
  """
  try:
    yield
  except BadValue as e:
    key = keys.get(e.field) or (f"{prefix}.{e.field}" if prefix else e.field)
    raise ConfigError(key, e.problem, e.expected) from None


@contextlib.contextmanager
def nested_config(prefix: str):
  """Re-raises the `ConfigError` (or `BadValue`) of another task's config that this config
  holds under `prefix` (the cellpainting job's ``profile`` is a profile_eval config) as the
  error of ``prefix.key``."""
  try:
    yield
  except ConfigError as e:
    raise ConfigError(f"{prefix}.{e.key}", e.problem, e.expected) from None
  except BadValue as e:
    raise ConfigError(f"{prefix}.{e.field}", e.problem, e.expected) from None


def comma_list(text: str, kind: type = str, *, field: str = "value") -> list:
  """"a, b,c" -> ["a", "b", "c"] (empty items dropped), each converted by `kind`; a value
  `kind` refuses is a `BadValue` of `field`."""
  items = [t.strip() for t in (text or "").split(",") if t.strip()]
  try:
    return [kind(t) for t in items]
  except ValueError:
    raise BadValue(field, f"{text!r} is not a comma-separated list of {kind.__name__} values",
                   f"comma-separated {kind.__name__} values") from None
