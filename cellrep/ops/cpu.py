"""What this host's CPU and memory offer: instruction-set flags and physical memory.

Read here once, for `cellrep.ops.policy`; nothing above `ops` looks at the host.
"""

from __future__ import annotations

import functools
import os
import pathlib

# x86 CPU flags of bfloat16 dot-product instructions. With them XLA:CPU (YNNPACK) runs a
# bf16 x bf16 -> f32 product at about twice its float32 rate (392 vs 202 GFLOP/s, AVX512-BF16,
# 2 cores); without them it converts the operands to float32 first.
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
  """The `flags` of /proc/cpuinfo (empty where there is none)."""
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return frozenset()
  for line in text.splitlines():
    if line.startswith("flags"):
      return frozenset(line.split(":", 1)[1].split())
  return frozenset()


def has_bf16_dot() -> bool:
  """Whether the CPU has one of `BF16_FLAGS`."""
  return not cpu_flags().isdisjoint(BF16_FLAGS)


def host_memory_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
