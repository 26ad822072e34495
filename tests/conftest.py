"""Test setup: 8 virtual CPU devices, a persistent compilation cache, the shared data."""

import os
import pathlib

from cellrep import hostmem

# Before jax starts XLA's threads: reuse freed host memory (see cellrep.hostmem).
hostmem.keep_freed_memory()

# Before any other use of jax: 8 CPU devices for mesh tests.
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_platforms", "cpu")

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

from cellrep.runtime import enable_compilation_cache  # noqa: E402

enable_compilation_cache(os.environ.get("CELLREP_COMPILATION_CACHE", str(REPO / ".cache" / "jax")))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data beside the repository (read in place, never copied)."""
  if not SHARED_DATA.is_dir():
    pytest.fail(f"{SHARED_DATA} is missing: clone cellrep next to the shared/ folder")
  return SHARED_DATA
