"""The train loop: batches in, ensemble steps, periodic logging, checks, checkpoints and hooks.

Metrics stay on device between log steps (no host sync per step); at each log
or checkpoint step they are fetched, checked finite (a NaN/Inf loss or gradient
norm stops the run with `NonFiniteLossError`), averaged and written. Before a
checkpoint is saved the state itself is checked finite too, so nothing after the
last good checkpoint is saved and `keep_checkpoints` never drops a good one for a
bad one.

In a run of several processes every process runs this loop on its own rows of
each batch; metrics and the step count are global arrays, read whole everywhere.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from cellrep import distributed
from cellrep.data.pipeline import to_device
from cellrep.errors import NonFiniteLossError
from cellrep.train.checkpoint import Checkpointer
from cellrep.train.metrics import MetricWriter

Hook = Callable[[int, object], None]  # (completed steps, state) -> None


def _summarise(pending: list[dict]) -> dict[str, np.ndarray]:
  """Per-name [steps, M] arrays of the pending per-step metrics."""
  return {k: np.stack([distributed.to_host(m[k]) for m in pending]) for k in pending[0]}


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
                            if jnp.issubdtype(x.dtype, jnp.inexact)]))


def _stop(what: str, step: int, members, checkpointer, last_good):
  if checkpointer is not None:
    checkpointer.wait()  # the last good checkpoint may still be being written
  kept = (f"the last good checkpoint (step {last_good}) is kept in {checkpointer.directory}"
          if checkpointer and last_good is not None else "no checkpoint was saved")
  on = f" (members {members})" if members is not None else ""
  raise NonFiniteLossError(f"non-finite {what} at step {step}{on}; {kept}. "
                           "Lower train.lr or check the input data.")


def fit(state, step_fn, batches: Iterator, *, rng: jax.Array, num_steps: int, data_sharding,
        writer: MetricWriter, checkpointer: Checkpointer | None = None,
        checkpoint_every: int = 100, log_every: int = 10,
        learning_rate: Callable[[int], float] | None = None,
        hooks: Sequence[tuple[int, Hook]] = (), progress: bool = True):
  """Trains from the state's step to `num_steps`; returns the final state.

  batches: iterator of host batches (a Grain DatasetIterator, saved with the state).
  hooks: (every_n_steps, hook) pairs, called after the step (and at the last step).
  """
  start = int(distributed.to_host(state.step)[0])
  last_good = checkpointer.latest_step() if checkpointer else None
  bar = tqdm(total=num_steps, initial=start, desc="train", unit="step", disable=not progress,
             dynamic_ncols=True)
  pending: list[dict] = []
  t0, steps_since = time.perf_counter(), 0
  for step in range(start, num_steps):
    done = step + 1
    batch = to_device(next(batches), data_sharding)
    state, metrics = step_fn(state, batch, rng)
    pending.append(metrics)
    steps_since += 1
    is_last = done == num_steps
    save = checkpointer is not None and (done % checkpoint_every == 0 or is_last)
    if done % log_every == 0 or save or is_last:
      summary = _summarise(pending)
      loss = summary["loss"]
      for name, what in (("loss", "loss"), ("grad_norm", "gradients")):
        finite = np.isfinite(summary.get(name, loss))  # [steps, M]
        if not finite.all():
          first_bad = done - len(pending) + int(np.argmin(finite.all(axis=1))) + 1
          members = np.where(~finite.all(axis=0))[0].tolist()
          _stop(what, first_bad, members, checkpointer, last_good)
      elapsed = time.perf_counter() - t0
      scalars = {f"train/{k}": float(np.mean(v)) for k, v in summary.items()}
      scalars["train/loss_member_max"] = float(np.max(np.mean(loss, axis=0)))
      scalars["train/steps_per_sec"] = steps_since / max(elapsed, 1e-9)
      if learning_rate is not None:
        scalars["train/lr"] = float(learning_rate(step))
      writer.write(done, scalars)
      # The loss and the objective's first metric besides it (accuracy, mse_masked, ...).
      shown = [k for k in summary if k not in ("loss", "grad_norm")][:1]
      bar.set_postfix({"loss": f"{scalars['train/loss']:.3f}",
                       **{k[:3]: f"{scalars[f'train/{k}']:.2f}" for k in shown}})
      pending, t0, steps_since = [], time.perf_counter(), 0
    if save:
      if not bool(distributed.to_host(_all_finite((state.params, state.batch_stats,
                                                   state.opt_state)))):
        _stop("parameters", done, None, checkpointer, last_good)
      checkpointer.save(done, state, batches)
      last_good = done
    for every, hook in hooks:
      if done % every == 0 or is_last:
        hook(done, state)
    bar.update(1)
  bar.close()
  if checkpointer is not None:
    checkpointer.wait()
  return state
