"""Process-wide JAX setup shared by the command line, the tests and the benchmarks."""

from __future__ import annotations


def enable_compilation_cache(directory: str, min_compile_secs: float = 0.5) -> None:
  """Persists XLA executables in `directory` ('' leaves the cache off): programs compiled for
  longer than `min_compile_secs` are read back by the next process instead of recompiled."""
  if not directory:
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", str(directory))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
