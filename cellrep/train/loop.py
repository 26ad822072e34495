"""The train loop: batches in, ensemble steps, periodic logging, checks, checkpoints and hooks.

Metrics stay on device between log steps (no host sync per step); at each log
or checkpoint step they are fetched, checked finite (a NaN/Inf loss stops the
run with `NonFiniteLossError`, and nothing after the last good checkpoint is
saved), averaged and written.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator, Sequence

import jax
import numpy as np
from tqdm import tqdm

from cellrep.data.pipeline import to_device
from cellrep.errors import NonFiniteLossError
from cellrep.train.checkpoint import Checkpointer
from cellrep.train.metrics import MetricWriter

Hook = Callable[[int, object], None]  # (completed steps, state) -> None


def _summarise(pending: list[dict]) -> dict[str, np.ndarray]:
  """Per-name [steps, M] arrays of the pending per-step metrics."""
  host = jax.device_get(pending)
  return {k: np.stack([np.asarray(m[k]) for m in host]) for k in host[0]}


def fit(state, step_fn, batches: Iterator, *, rng: jax.Array, num_steps: int, data_sharding,
        writer: MetricWriter, checkpointer: Checkpointer | None = None,
        checkpoint_every: int = 100, log_every: int = 10,
        learning_rate: Callable[[int], float] | None = None,
        hooks: Sequence[tuple[int, Hook]] = (), progress: bool = True):
  """Trains from the state's step to `num_steps`; returns the final state.

  batches: iterator of host batches (a Grain DatasetIterator, saved with the state).
  hooks: (every_n_steps, hook) pairs, called after the step (and at the last step).
  """
  start = int(jax.device_get(state.step)[0])
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
      finite = np.isfinite(loss)  # [steps, M]
      if not finite.all():
        first_bad = done - len(pending) + int(np.argmin(finite.all(axis=1))) + 1
        members = np.where(~finite.all(axis=0))[0].tolist()
        kept = (f"the last good checkpoint (step {last_good}) is kept in {checkpointer.directory}"
                if checkpointer and last_good is not None else "no checkpoint was saved")
        raise NonFiniteLossError(f"non-finite loss at step {first_bad} (members {members}); {kept}. "
                                 "Lower train.lr or check the input data.")
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
