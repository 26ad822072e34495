r"""Runs one cellrep job from a config file.

  python -m cellrep.launch --config=configs/demo.py --workdir=workdir/demo
  python -m cellrep.launch --config=configs/cellsighter.py:runlocal --workdir=DIR \
      --config.train.steps=200

  # one run over several processes (each started so; launch/ has scripts that do it):
  python -m cellrep.launch --config=... --workdir=DIR \
      --coordinator=HOST:PORT --num_processes=N --process_id=I

The config's `task` names a module of `cellrep.tasks` whose `run(config, workdir)`
does the work. This file only parses flags, joins the processes of a multi-process
run (`cellrep.distributed`: from the flags, CELLREP_* variables, or SLURM's or a TPU
VM's environment), sets up logging, host-memory reuse (`cellrep.hostmem`) and the
persistent compilation cache, removes what interrupted writes left in the work
directory, and reports errors of input or configuration as one line on stderr with
exit code 2.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from cellrep import distributed, files, hostmem
from cellrep.runtime import enable_compilation_cache
from cellrep.errors import CellrepError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with `:arg` (configs/cellsighter.py:runlocal).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_CACHE = flags.DEFINE_string(
    "compilation_cache", os.environ.get("CELLREP_COMPILATION_CACHE",
                                        str(pathlib.Path.home() / ".cache" / "cellrep" / "jax")),
    "Persistent XLA compilation cache directory ('' disables it).")

_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "HOST:PORT of process 0 in a run of several processes.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the run.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", None, "CPU devices this process exposes (for runs on CPUs; default 1).")
_KEEP_FREED_MEMORY = flags.DEFINE_bool(
    "keep_freed_memory", os.environ.get("CELLREP_KEEP_FREED_MEMORY", "1") != "0",
    "Keep freed host memory in the process for the next step (cellrep.hostmem): faster "
    "CPU steps; --nokeep_freed_memory bounds the process by what it holds live instead of "
    "its peak heap (docs/performance.md, Memory).")

EXIT_USAGE = 2
# Libraries whose INFO lines (one per checkpoint file, thread and timing) drown the run's own.
_QUIET = ("/orbax/", "/grain/", "/jax/_src/")


class _QuietLibraries:
  """absl-handler filter: warnings and errors from everyone, INFO only from cellrep."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or not any(p in record.pathname for p in _QUIET)


def _fail(message: str):
  print(f"cellrep: error: {message}", file=sys.stderr)
  sys.exit(EXIT_USAGE)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except CellrepError as e:  # a config file's own check of its `:arg`
    _fail(str(e))
  except (KeyError, AttributeError, TypeError, ValueError) as e:
    # ml_collections raises these for --config.x=v naming an unknown key or a bad value.
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    _fail(f"bad config override: {' '.join(str(message).split())}")
  except flags.Error as e:
    # Config files raise CellrepError for bad `:arg` values; absl wraps it.
    cause = e.__cause__ or e.__context__
    _fail(str(cause) if isinstance(cause, CellrepError) else str(e))


def run_task(config, workdir: pathlib.Path):
  """Imports `cellrep.tasks.<config.task>` and runs it."""
  try:
    module = importlib.import_module(f"cellrep.tasks.{config.task}")
  except ModuleNotFoundError as e:
    if e.name == f"cellrep.tasks.{config.task}":
      raise CellrepError(f"config.task: unknown task {config.task!r}") from None
    raise
  return module.run(config, workdir)


def main(argv):
  # Before jax starts XLA's threads (flags are parsed; no backend is up yet).
  kept = _KEEP_FREED_MEMORY.value and hostmem.keep_freed_memory()
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}")
  try:
    config = _CONFIG.value
    has_task = config is not None and "task" in config
  except OSError as e:  # ml_collections defers a failed config load to first access
    _fail(" ".join(str(e).split()))
  if config is None:
    _fail("--config is required (for example --config=configs/demo.py)")
  if _WORKDIR.value is None:
    _fail("--workdir is required")
  if not has_task:
    _fail("the config has no `task` field naming a module of cellrep.tasks")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  workdir = pathlib.Path(_WORKDIR.value)
  problem = files.writable_dir_problem(workdir)
  if problem:
    _fail(f"--workdir {workdir}: {problem}")
  try:
    several = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                     _CPU_DEVICES.value)
  except ValueError as e:
    _fail(str(e))
  enable_compilation_cache(_CACHE.value)
  if distributed.is_writer():
    for path in files.remove_temporaries(workdir):
      logging.info("removed %s, left by an interrupted write", path)
  if several:
    import jax
    logging.info("process %d of %d, %d of %d devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
  logging.info("host memory: %s", "freed buffers kept for reuse (cellrep.hostmem)" if kept else
               "freed buffers returned to the system")
  logging.info("task %s, workdir %s\n%s", config.task, workdir, config)
  try:
    run_task(config, workdir)
  except CellrepError as e:
    _fail(str(e))
  distributed.barrier("end of run")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
