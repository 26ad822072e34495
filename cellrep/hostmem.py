"""Host memory: keep freed buffers in the process, so XLA:CPU's buffers are not page-faulted anew.

XLA:CPU allocates an executable's temporary buffers (activations, im2col columns,
Winograd tiles: 0.6 GB for one ResNet-50 member predicting 128 crops, several GB for
a train step) with malloc on every run, from its worker threads. glibc serves an
allocation over 32 MiB, and any large one made on a thread with its own arena, by a
fresh mmap and unmaps it on free, so each run touches all of that memory for the
first time again: a page fault and a zeroed page per 4 KiB. On the 2-core test
machine that cost ~0.1 ms per MB, more than writing the data: the ResNet-50 stem's
7x7 im2col at batch 128 took 275 ms a run, 105 ms once its buffers were reused.

`keep_freed_memory` sets glibc's malloc to serve every thread from the main heap
(one arena), never by mmap, and never to give freed memory back to the OS. After a
program's first two runs its buffers come from memory already mapped: no page
faults. The process then keeps its peak heap (which it needs again on the next
step). Call it first thing in a process, before jax starts XLA's threads (those
created earlier keep their own arenas). The same as starting the process with
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=-1``. A no-op off
glibc (macOS, musl); off with ``CELLREP_KEEP_FREED_MEMORY=0`` or ``python -m
cellrep.launch --nokeep_freed_memory``, which bounds a process by the memory it holds
live rather than by its peak heap grown by fragmentation (up to 2x more: 5.5 vs 2.9 GiB
for one 47-channel run, docs/performance.md).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))  # -1: SIZE_MAX, never trim


def on_glibc() -> bool:
  """Whether this process's C library is glibc (whose malloc `keep_freed_memory` sets)."""
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
  """Makes glibc malloc reuse freed memory instead of unmapping it. True if applied."""
  if os.environ.get("CELLREP_KEEP_FREED_MEMORY", "1") == "0" or not on_glibc():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
