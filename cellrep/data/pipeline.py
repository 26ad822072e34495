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
"""

from __future__ import annotations

from typing import Iterator

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cellrep.data.crops import CropSource
from cellrep.data.sampling import EpochSampler


class ReadCrops(grain.transforms.Map):
  """A batch of cell indices -> a batch of crop dicts, through a CropSource (pickled to workers)."""

  def __init__(self, source: CropSource):
    self.source = source

  def map(self, indices):
    return self.source.read(indices)


def train_dataset(source: CropSource, sampler: EpochSampler, batch_size: int, *,
                  workers: int = 0, threads: int = 8, prefetch: int = 2) -> grain.IterDataset:
  """Batches of `batch_size` crops of the cells `sampler` draws; drops a last partial batch.

  threads: batches read concurrently (each batch's reads are themselves parallel in
  TensorStore); prefetch: batches read ahead beyond those (host memory: threads +
  prefetch batches).
  """
  ds = (grain.MapDataset.source(sampler)
        .batch(batch_size, drop_remainder=True)
        .map(ReadCrops(source))
        .to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                           prefetch_buffer_size=threads + prefetch)))
  if workers > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def eval_batches(source: CropSource, indices: np.ndarray, batch_size: int, *,
                 threads: int = 8) -> Iterator[dict[str, np.ndarray]]:
  """Crops of `indices` in order, in batches of exactly `batch_size`; padding has index -1.

  threads: batches read concurrently (Grain reads no more at once than it buffers, so
  the buffer holds `threads` batches).
  """
  ds = (grain.MapDataset.source(np.asarray(indices, np.int64))
        .batch(batch_size, drop_remainder=False)
        .map(ReadCrops(source))
        .to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)))
  for batch in ds:
    n = len(batch["index"])
    if n < batch_size:
      batch = {k: _pad(v, batch_size) for k, v in batch.items()}
      batch["index"][n:] = -1
    yield batch


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  out = np.zeros((size,) + x.shape[1:], x.dtype)
  out[:len(x)] = x
  return out


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Batch axis split over the mesh's `data` axis, replicated over `member`."""
  return NamedSharding(mesh, P("data"))


def to_device(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """A host batch as global arrays sharded along the batch axis (works across hosts)."""
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in batch.items() if k in ("crop", "label")}
