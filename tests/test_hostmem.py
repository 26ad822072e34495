"""Host-memory reuse: with it, glibc serves large buffers from the heap and keeps them when freed.

Deterministic allocator checks through glibc's own accounting (``mallinfo2``). What this
saves in page faults and time is measured by ``benchmarks/bench_hostmem.py``, not here:
fault counts depend on the machine's load.
"""

import ctypes
import json
import os
import subprocess
import sys

import pytest

from cellrep import hostmem

# A fresh process (the setting must precede other threads): mallocs 200 MB on a worker
# thread (as XLA's are), frees it, and reports glibc's accounting after each step.
_PROBE = r"""
import ctypes, json, threading
from cellrep import hostmem
applied = hostmem.keep_freed_memory()

class Info(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in
              "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
size = 200 << 20
out = {"applied": applied}

def work():
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  held = libc.mallinfo2()
  libc.free(p)
  freed = libc.mallinfo2()
  again = libc.malloc(size)
  out.update(mmapped_held=held.hblkhd, main_heap_after_free=freed.arena,
             heap_free_after_free=freed.fordblks, reused=(again == p))
  libc.free(again)

thread = threading.Thread(target=work)
thread.start(); thread.join()
out["size"] = size
print(json.dumps(out))
"""


def _probe(keep: bool) -> dict:
  env = dict(os.environ, CELLREP_KEEP_FREED_MEMORY="1" if keep else "0")
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       check=True, timeout=120)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _has_mallinfo2() -> bool:  # glibc >= 2.33
  return hostmem.on_glibc() and hasattr(ctypes.CDLL(None), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="glibc >= 2.33 malloc only")
def test_large_buffers_come_from_the_heap_and_stay():
  kept, fresh = _probe(keep=True), _probe(keep=False)
  assert kept["applied"] and not fresh["applied"]
  size = kept["size"]
  # By default glibc maps a buffer this large on its own and unmaps it on free.
  assert fresh["mmapped_held"] >= size, fresh
  # Kept: no mmap, even on a worker thread; the freed memory stays in the heap and the
  # next buffer of the same size is served from it.
  assert kept["mmapped_held"] < size, kept
  assert kept["heap_free_after_free"] >= size, kept
  assert kept["main_heap_after_free"] >= size, kept
  assert kept["reused"], kept


def test_opt_out(monkeypatch):
  monkeypatch.setenv("CELLREP_KEEP_FREED_MEMORY", "0")
  assert hostmem.keep_freed_memory() is False
