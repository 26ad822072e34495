"""Metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard events.

clu's metric writers import TensorFlow and tensorboardX imports PyTorch when it is
installed; the events are written by `cellrep.train.events`, which needs neither.
Only process 0 writes. A run resumed from a checkpoint at step s first drops the
records after s (written by the interrupted run after its last checkpoint) and the
evaluation records (``eval/*``, written again at the end of every run), so each step
and each evaluation appears once.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from cellrep import distributed
from cellrep.files import write_text
from cellrep.train.events import EventWriter


def _plain(v):
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item() if np.ndim(v) == 0 else v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf
  return v


class MetricWriter:

  def __init__(self, workdir, tensorboard: bool = True, resume_step: int | None = None):
    self.enabled = distributed.is_writer()
    workdir = pathlib.Path(workdir)
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if self.enabled and resume_step is not None:
      self._drop_after(resume_step)
    if self.enabled and tensorboard:
      purge = None if resume_step is None else resume_step + 1
      self._tb = EventWriter(workdir / "tensorboard", purge_step=purge)

  def _drop_after(self, step: int) -> None:
    kept = [r for r in read_metrics(self.path.parent)
            if r["step"] <= step and not any(k.startswith("eval/") for k in r)]
    write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in scalars.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      self._tb.write(int(step), {k: float(v) for k, v in scalars.items()
                                 if np.ndim(v) == 0 and isinstance(_plain(v), (int, float))})

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
