"""Optimizer and learning-rate schedule from config."""

from __future__ import annotations

import optax

SCHEDULES = ("constant", "exponential", "cosine")


def learning_rate(lr: float, schedule: str, total_steps: int, *, decay_rate: float = 0.85,
                  decay_steps: int = 1000, warmup_steps: int = 0) -> optax.Schedule:
  """`exponential` is CellSighter's ExponentialLR (×decay_rate every decay_steps, i.e. per epoch)."""
  if schedule == "constant":
    main = optax.constant_schedule(lr)
  elif schedule == "exponential":
    main = optax.exponential_decay(lr, transition_steps=max(1, decay_steps), decay_rate=decay_rate,
                                   staircase=True)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=max(1, total_steps - warmup_steps))
  else:
    raise ValueError(f"unknown schedule {schedule!r}; known: {SCHEDULES}")
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def adam(schedule: optax.Schedule, weight_decay: float = 0.0,
         grad_clip: float = 0.0) -> optax.GradientTransformation:
  """Adam (AdamW when weight_decay > 0), optionally after clipping the global gradient norm."""
  opt = optax.adamw(schedule, weight_decay=weight_decay) if weight_decay else optax.adam(schedule)
  return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip else opt


def kernels(params):
  """True for the convolution and dense kernels of a Flax parameter tree (what Keras'
  kernel regularisers cover), False for biases and BatchNorm's scales."""
  import jax
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def sgd(schedule: optax.Schedule, momentum: float = 0.9, nesterov: bool = True,
        l2: float = 0.0, grad_clip: float = 0.0) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum, as the Cell Painting CNN was trained.

  l2: Keras' kernel regulariser, a loss term l2 * sum(w^2) over the kernels: 2 * l2 * w
  added to each kernel's gradient, before the gradient is clipped (Keras clips the
  gradient of the whole loss).
  """
  parts = [optax.add_decayed_weights(2.0 * l2, mask=kernels)] if l2 else []
  if grad_clip:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov and momentum > 0))
  return optax.chain(*parts) if len(parts) > 1 else parts[0]
