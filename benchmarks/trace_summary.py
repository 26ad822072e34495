r"""Where a profiled step spends its time: XLA ops of a `--profile` trace summed by kind.

  .venv/bin/python benchmarks/trace_summary.py DIR/resnet50_x10_auto [--top 25]

Reads the perfetto trace (`*.json.gz`) that `--profile` writes beside the
TensorBoard one and sums the durations of XLA's thunks by kind (the op name
without its numeric suffix: `ynn_fusion` = a matrix product or convolution run
by YNNPACK, `copy_bitcast_fusion` = a layout change, `concatenate` = im2col
copies, `multiply_add_fusion` = elementwise updates, ...), summed over threads.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

# Trace events that enclose ops rather than being ops.
_ENCLOSING = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "ParseArguments",
              "CommonPjRtLoadedExecutable", "PjRt", "Thunk")


def summarise(directory) -> list[tuple[str, float, int]]:
  """[(op kind, total milliseconds, count)] of the trace under `directory`, largest first."""
  traces = sorted(pathlib.Path(directory).rglob("*.json.gz"))
  if not traces:
    raise SystemExit(f"no perfetto trace (*.json.gz) under {directory}")
  events = json.load(gzip.open(traces[-1]))["traceEvents"]
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X" or e["name"].startswith(_ENCLOSING):
      continue
    kind = re.sub(r"[.\d]+$", "", e["name"])
    total[kind] += e["dur"] / 1e3
    count[kind] += 1
  return [(k, ms, count[k]) for k, ms in total.most_common()]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("directory")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args()
  rows = summarise(args.directory)
  all_ms = sum(ms for _, ms, _ in rows)
  print(f"{'op kind':40s} {'ms':>10s} {'share':>6s} {'count':>6s}")
  for kind, ms, n in rows[:args.top]:
    print(f"{kind[:40]:40s} {ms:10.1f} {100 * ms / all_ms:5.1f}% {n:6d}")
  print(f"{'all ops':40s} {all_ms:10.1f}")


if __name__ == "__main__":
  main()
