"""Host-memory reuse: with it, a program's large buffers stop page-faulting after its first runs."""

import json
import os
import subprocess
import sys

import pytest

from cellrep import hostmem

# A fresh process (the setting must precede XLA's threads): runs a program whose im2col
# columns (temporary buffers of ~200 MB) cannot be fused away, and reports the minor page
# faults of its later runs in pages, and the buffers' size in pages. The heap settles after a
# few runs: XLA frees a run's buffers after its result is ready, so the next run's can be
# allocated first.
_PROBE = r"""
import json, resource, sys
from cellrep import hostmem
applied = hostmem.keep_freed_memory()
import jax, jax.numpy as jnp
from cellrep.ops.conv import conv2d
x = jnp.ones((16, 64, 64, 8)); w = jnp.ones((7, 7, 8, 8))
f = jax.jit(lambda x, w: conv2d(x, w, (1, 1), "SAME", "im2col"))
compiled = f.lower(x, w).compile()
for _ in range(8):
  f(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x, w).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
pages = compiled.memory_analysis().temp_size_in_bytes / resource.getpagesize()
print(json.dumps({"applied": applied, "faults": faults, "temp_pages": pages}))
"""


def _probe(keep: bool) -> dict:
  env = dict(os.environ, CELLREP_KEEP_FREED_MEMORY="1" if keep else "0", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       check=True, timeout=300)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not hostmem.on_glibc(), reason="glibc malloc only")
def test_reused_buffers_stop_page_faulting():
  kept, fresh = _probe(keep=True), _probe(keep=False)
  assert kept["applied"] and not fresh["applied"]
  assert fresh["temp_pages"] > 20_000  # > 80 MB: above glibc's largest mmap threshold
  # Without reuse every run maps its temporary buffer anew and faults on each page.
  assert fresh["faults"] > 0.5 * fresh["temp_pages"], fresh
  assert kept["faults"] < 0.05 * kept["temp_pages"], kept


def test_opt_out(monkeypatch):
  monkeypatch.setenv("CELLREP_KEEP_FREED_MEMORY", "0")
  assert hostmem.keep_freed_memory() is False
