"""Losses: mean over the batch of per-example losses, with an optional validity mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels, label_smoothing: float = 0.0, mask=None):
  """Softmax cross-entropy. logits: [B, C] float32; labels: [B] int; mask: [B] (1 = counts)."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  losses = optax.softmax_cross_entropy(logits, targets)
  if mask is None:
    return jnp.mean(losses)
  mask = mask.astype(losses.dtype)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
