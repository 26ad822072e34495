"""Grain pipelines from cell indices to host batches, and host batches to device.

Training reads as one chain::

  MapDataset.source(EpochSampler) -> batch -> map(read the batch's crops) -> to_iter_dataset
      [-> mp_prefetch(workers)]

Crops are read a batch at a time (`CropSource.read`: one call, window reads issued
together, FOVs held in memory), which is several times faster than one Grain
element per crop; reader threads work on different batches. The iterator's state
(a position in the sampler's batches) is saved with the train state so a resumed
run reads exactly the batches it would have read. Evaluation reads cells in order
and pads the last batch, so one compiled program serves all.

A host batch is a dict of numpy arrays: crop [B, K+2, S, S] float32, label [B]
int32, index [B] int64 (row of cells.parquet; -1 marks padding).

In a run of several processes every process draws the same global batches of cell
indices and reads only its own rows of each (`rows`, from
`cellrep.distributed.local_rows`); `to_device` assembles the pieces into global
arrays. One process reads every row: the same batches either way.
"""

from __future__ import annotations

from typing import Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cellrep.data.crops import CropSource
from cellrep.data.sampling import EpochSampler


class TakeRows(grain.transforms.Map):
  """A batch of cell indices -> this process's rows of it."""

  def __init__(self, rows: slice):
    self.rows = rows

  def map(self, indices):
    return indices[self.rows]


class ReadCrops(grain.transforms.Map):
  """A batch of cell indices -> a batch of crop dicts, through a CropSource (pickled to workers)."""

  def __init__(self, source: CropSource):
    self.source = source

  def map(self, indices):
    return self.source.read(indices)


def train_dataset(source: CropSource, sampler: EpochSampler, batch_size: int, *,
                  workers: int = 0, threads: int = 8, prefetch: int = 2,
                  rows: slice = slice(None)) -> grain.IterDataset:
  """Batches of `batch_size` crops of the cells `sampler` draws; drops a last partial batch.

  rows: the rows of each batch this process reads (default all).
  threads: batches read concurrently (each batch's reads are themselves parallel in
  TensorStore); prefetch: batches read ahead beyond those (host memory: threads +
  prefetch batches).
  """
  ds = (grain.MapDataset.source(sampler)
        .batch(batch_size, drop_remainder=True)
        .map(TakeRows(rows))
        .map(ReadCrops(source))
        .to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                           prefetch_buffer_size=threads + prefetch)))
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def eval_batches(source: CropSource, indices: np.ndarray, batch_size: int, *,
                 threads: int = 8, rows: slice = slice(None)) -> Iterator[dict[str, np.ndarray]]:
  """Crops of `indices` in order, in batches of exactly `batch_size` (this process's
  `rows` of them); padding has index -1.

  threads: batches read concurrently (Grain reads no more at once than it buffers, so
  the buffer holds `threads` batches).
  """
  indices = np.asarray(indices, np.int64)
  padded = np.full(-(-len(indices) // batch_size) * batch_size, -1, np.int64)
  padded[:len(indices)] = indices
  return iter(grain.MapDataset.source(padded)
              .batch(batch_size, drop_remainder=False)
              .map(TakeRows(rows))
              .map(ReadValid(source))
              .to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                 prefetch_buffer_size=threads)))


class ReadValid(ReadCrops):
  """ReadCrops of the indices ≥ 0 (padding comes last), padded back with zeros and index -1."""

  def map(self, indices):
    n, size = int((indices >= 0).sum()), len(indices)
    if n == size:
      return self.source.read(indices)
    if n == 0:  # a process's rows of the last batch can be all padding
      batch = self.source.read(np.zeros(1, np.int64))
      batch = {k: _pad(v[:0], size) for k, v in batch.items()}
    else:
      batch = {k: _pad(v, size) for k, v in self.source.read(indices[:n]).items()}
    batch["index"][n:] = -1
    return batch


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  out = np.zeros((size,) + x.shape[1:], x.dtype)
  out[:len(x)] = x
  return out


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis split over the mesh's `data` axis, replicated over `member`."""
  return NamedSharding(mesh, P("data"))


def to_device(batch: dict[str, np.ndarray], sharding: NamedSharding,
              keys=("crop", "label")) -> dict[str, jax.Array]:
  """A host batch (this process's rows) as global arrays sharded along the batch axis."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items() if k in keys}
