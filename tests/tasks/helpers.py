"""Configs as the command line loads them: a configs/ file's get_config(arg), locked."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def get_config(name: str, arg: str | None = None):
  """configs/<name>.py's get_config(arg), locked as `--config=configs/<name>.py:arg` is."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.lock()
  return config
