"""Many processes, one run: JAX's own multi-process runtime (`jax.distributed`), nothing of ours.

A run over P processes is the run of one process with P times the devices: the same
mesh over all devices (`jax.devices()`), the same global batches, the same numbers.
What each process does differently is only what it reads and writes:

- Reading: each process reads the rows of every global batch that its own devices
  hold (`local_rows`) and the batch is assembled into global arrays from those pieces
  (`jax.make_array_from_process_local_data`, `cellrep.data.pipeline.to_device`).
- Results: outputs computed where the data live are gathered to every process
  (`to_host`), so each process has the whole prediction, embedding or metric.
- Writing: process 0 alone writes shared files (`is_writer`: `cellrep.files`, the
  report, the store, metrics); the others wait at a barrier (`barrier`,
  `writer_first`) before they read what it wrote. Orbax checkpoints and Grain's
  iterator state are written by every process, as those libraries require.

`initialize` starts the runtime from explicit arguments (`python -m cellrep.launch
--coordinator=host:port --num_processes=N --process_id=i`) or from the environment
that SLURM provides, or (CELLREP_DISTRIBUTED=1) the cluster JAX detects, such as a
TPU-VM pod; with none of these it does nothing and the run is one process. On CPUs the
processes' collectives go through Gloo.
"""

from __future__ import annotations

import contextlib
import glob
import os
from typing import Iterator

import numpy as np

# The environment of one process of a run started by `launch/local.sh` (or by hand).
ENV_COORDINATOR = "CELLREP_COORDINATOR"
ENV_NUM_PROCESSES = "CELLREP_NUM_PROCESSES"
ENV_PROCESS_ID = "CELLREP_PROCESS_ID"
ENV_CPU_DEVICES = "CELLREP_CPU_DEVICES"
# "1": join the run JAX's cluster detection finds (TPU-VM pods: launch/tpu_pod.sh sets it).
ENV_DISTRIBUTED = "CELLREP_DISTRIBUTED"


def _cluster_env() -> bool:
  """Whether a scheduler started this process as one of several (SLURM with more than one
  task, or CELLREP_DISTRIBUTED=1: JAX finds the others itself)."""
  if os.environ.get(ENV_DISTRIBUTED) == "1":
    return True
  # SLURM_STEP_NUM_TASKS is set by srun for its tasks: a plain `python` line in a batch
  # script of several tasks is one process, not one of several.
  return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in os.environ


def _local_gpus() -> list[int] | None:
  """Every GPU this process sees (CUDA_VISIBLE_DEVICES, else /dev/nvidiaN), or None."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    n = len([d for d in visible.split(",") if d.strip()])
  else:
    n = len(glob.glob("/dev/nvidia[0-9]*"))
  return list(range(n)) or None


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_devices: int | None = None) -> bool:
  """Joins this process to a multi-process run; True when it did (False: one process).

  Arguments left None come from CELLREP_COORDINATOR / CELLREP_NUM_PROCESSES /
  CELLREP_PROCESS_ID, else from SLURM's environment or, with CELLREP_DISTRIBUTED=1, from
  whatever cluster JAX detects (a TPU-VM pod).
  cpu_devices (or CELLREP_CPU_DEVICES): CPU devices this process exposes. Call it
  before anything else uses jax.
  """
  import jax
  env = os.environ
  coordinator = coordinator or env.get(ENV_COORDINATOR) or None
  num_processes = num_processes or int(env.get(ENV_NUM_PROCESSES, "0")) or None
  if process_id is None and env.get(ENV_PROCESS_ID, "") != "":
    process_id = int(env[ENV_PROCESS_ID])
  cpu_devices = cpu_devices or int(env.get(ENV_CPU_DEVICES, "0")) or None
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  explicit = coordinator is not None or (num_processes or 1) > 1
  if not explicit and not _cluster_env():
    return False
  if explicit and (coordinator is None or num_processes is None or process_id is None):
    raise ValueError("a multi-process run needs all of coordinator, num_processes and "
                     f"process_id (got {coordinator!r}, {num_processes!r}, {process_id!r})")
  if num_processes == 1:
    return False
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
  else:
    # JAX's SLURM detection gives each task only the GPU numbered by its SLURM_LOCALID; a
    # task per node (launch/slurm.sbatch) drives all of its node's GPUs.
    slurm = "SLURM_PROCID" in env and env.get(ENV_DISTRIBUTED) != "1"
    jax.distributed.initialize(local_device_ids=_local_gpus() if slurm else None)
  return True


def process_count() -> int:
  import jax
  return jax.process_count()


def process_index() -> int:
  import jax
  return jax.process_index()


def combine_disjoint(values: np.ndarray, mine: np.ndarray) -> np.ndarray:
  """Each process computed `values[mine]` (its share, the shares disjoint): the whole array,
  on every process."""
  import jax
  if jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  # As 32-bit words: jax would round float64 to float32 on the way (x64 is off).
  values = np.ascontiguousarray(values)
  words = np.asarray(multihost_utils.process_allgather(values.view(np.uint32)))
  every = words.view(values.dtype).reshape((-1,) + values.shape)  # [P, ...]
  owners = np.asarray(multihost_utils.process_allgather(mine.astype(np.int32))).astype(bool)
  if (owners.sum(axis=0) > 1).any():
    raise ValueError("processes computed overlapping shares")
  out = values.copy()
  for p in range(len(every)):
    out[owners[p]] = every[p][owners[p]]
  return out


def is_writer() -> bool:
  """Whether this process writes the run's shared files (process 0)."""
  import jax
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process of the run reaches `name` (a no-op in one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def writer_first(name: str) -> Iterator[bool]:
  """Process 0 runs the block first (yields True); the others wait for it, then run it
  (yielding False: read what process 0 wrote, make nothing). Process 0 reaches the barrier
  even when its block fails, so the others do not wait for ever."""
  if is_writer():
    try:
      yield True
    finally:
      barrier(name)
  else:
    barrier(name)
    yield False


def local_rows(sharding, global_size: int) -> slice:
  """The rows of a batch of `global_size` (its leading axis, split by `sharding`) that
  this process's devices hold: one contiguous block (the devices of a mesh from
  `jax.make_mesh` are ordered by process)."""
  shape = (global_size,) + (1,) * (len(sharding.spec) - 1 if sharding.spec else 0)
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map(shape).values():
    rows = index[0] if index else slice(None)
    start, stop, _ = rows.indices(global_size)
    starts.append(start)
    stops.append(stop)
  lo, hi = min(starts), max(stops)
  covered = np.zeros(global_size, bool)
  for start, stop in zip(starts, stops):
    covered[start:stop] = True
  if not covered[lo:hi].all():
    raise ValueError(f"this process's rows of a batch of {global_size} are not contiguous")
  return slice(lo, hi)


def to_host(x) -> np.ndarray:
  """A global array's whole value as numpy on every process (gathered across processes
  when it spans devices of other processes and is not replicated)."""
  import jax
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
