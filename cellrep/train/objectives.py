"""Objectives: the seam between a model and a job.

An objective says how a model's outputs are scored against a batch and what a
prediction is:

  loss(outputs, batch) -> (scalar loss, {metric name: scalar})   (the names in `metrics`)
  predict(outputs) -> per-example outputs (probabilities, reconstructions)

`outputs` is what the model returns in training; `batch` is the device batch (``label``
and the like) plus ``images``, the network inputs the step built from it. One ensemble
train step (`cellrep.train.ensemble.MemberStep`) and one predictor
(`cellrep.infer.predict.make_predict_fn`) serve every objective:

- `SoftmaxCrossEntropy`: integer labels [B] (CellSighter, treatments), label smoothing;
- `SigmoidBinaryCrossEntropy`: multi-hot targets [B, C] (HPA localisation), per-class
  weights (`class_weights`: ``1 - count/total`` or inverse frequency);
- `MaskedReconstruction`: a model returning ``{"reconstruction", "mask"}`` is scored by
  the mean squared error on masked pixels (or on all of them) against ``images``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cellrep.errors import BadValue


class Objective(Protocol):
  metrics: tuple[str, ...]

  def loss(self, outputs: Any, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]: ...

  def predict(self, outputs: Any) -> jax.Array: ...


def _masked_mean(values, mask=None):
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy:
  """Softmax cross-entropy on logits [B, C] against integer labels [B] (``label``)."""
  label_smoothing: float = 0.0
  metrics: tuple[str, ...] = ("loss", "accuracy")

  def loss(self, logits, batch):
    logits, labels = logits.astype(jnp.float32), batch["label"]
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if self.label_smoothing:
      targets = optax.smooth_labels(targets, self.label_smoothing)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

  def predict(self, logits):
    """Class probabilities [B, C] float32."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class SigmoidBinaryCrossEntropy:
  """Per-class sigmoid binary cross-entropy on logits [B, C] against multi-hot ``label``
  [B, C] (1 = the class is present).

  class_weights: [C] multipliers of each class's term (None: all 1); the loss is the mean
  over examples and classes of weight x BCE. threshold: a class is predicted present
  when its probability reaches it (metrics only).
  """
  class_weights: tuple[float, ...] | None = None
  threshold: float = 0.5
  metrics: tuple[str, ...] = ("loss", "label_accuracy", "exact_match", "micro_f1")

  def loss(self, logits, batch):
    logits = logits.astype(jnp.float32)
    targets = batch["label"].astype(jnp.float32)
    terms = optax.sigmoid_binary_cross_entropy(logits, targets)
    if self.class_weights is not None:
      terms = terms * jnp.asarray(self.class_weights, jnp.float32)
    loss = jnp.mean(terms)
    pred = jax.nn.sigmoid(logits) >= self.threshold
    truth = targets > 0.5
    tp = jnp.sum(pred & truth)
    wrong = jnp.sum(pred != truth)
    return loss, {"loss": loss, "label_accuracy": jnp.mean(pred == truth),
                  "exact_match": jnp.mean(jnp.all(pred == truth, axis=-1)),
                  "micro_f1": 2 * tp / jnp.maximum(2 * tp + wrong, 1)}

  def predict(self, logits):
    """Per-class probabilities [B, C] float32."""
    return jax.nn.sigmoid(logits.astype(jnp.float32))


def class_weights(counts, method: str = "one_minus_frequency") -> tuple[float, ...]:
  """Per-class weights from positive counts [C]: ``one_minus_frequency`` is 1 - count/total
  (Lee & Bamford), ``inverse_frequency`` total / (C x count) (a class never seen: 0)."""
  counts = np.asarray(counts, np.float64)
  total = counts.sum()
  if method == "one_minus_frequency":
    w = 1.0 - counts / max(total, 1.0)
  elif method == "inverse_frequency":
    w = np.where(counts > 0, total / (len(counts) * np.maximum(counts, 1.0)), 0.0)
  else:
    raise BadValue("method", f"unknown class weighting {method!r}",
                   "one_minus_frequency or inverse_frequency")
  return tuple(float(v) for v in w)


@dataclasses.dataclass(frozen=True)
class MaskedReconstruction:
  """Mean squared error of ``reconstruction`` [B, H, W, C] against the network inputs
  (``images``), on the pixels the model masked (``mask`` [B, H, W] or [B, H, W, 1], 1 =
  hidden from the model) or, with ``masked_only=False``, on all pixels."""
  masked_only: bool = True
  metrics: tuple[str, ...] = ("loss", "mse_masked", "mse_all")

  def loss(self, outputs, batch):
    recon = outputs["reconstruction"].astype(jnp.float32)
    target = batch["images"].astype(jnp.float32)
    mask = outputs["mask"].astype(jnp.float32)
    if mask.ndim == recon.ndim - 1:
      mask = mask[..., None]
    err = jnp.square(recon - target)
    mask = jnp.broadcast_to(mask, err.shape)
    masked, whole = _masked_mean(err, mask), jnp.mean(err)
    loss = masked if self.masked_only else whole
    return loss, {"loss": loss, "mse_masked": masked, "mse_all": whole}

  def predict(self, outputs):
    """The reconstruction [B, H, W, C] float32."""
    return outputs["reconstruction"].astype(jnp.float32)


OBJECTIVES = {
    "softmax_cross_entropy": SoftmaxCrossEntropy,
    "sigmoid_binary_cross_entropy": SigmoidBinaryCrossEntropy,
    "masked_reconstruction": MaskedReconstruction,
}


def build(name: str, **kwargs) -> Objective:
  """The objective called `name` (one of `OBJECTIVES`) with these arguments."""
  if name not in OBJECTIVES:
    raise BadValue("objective", f"unknown objective {name!r}", f"one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[name](**kwargs)


def to_dict(objective: Objective) -> dict:
  """{"name": ..., arguments...}: what `build(**d)` makes the same objective from (model.json)."""
  name = next(n for n, cls in OBJECTIVES.items() if isinstance(objective, cls))
  args = {f.name: getattr(objective, f.name) for f in dataclasses.fields(objective)
          if f.name != "metrics"}
  return {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}}


def from_dict(d: dict) -> Objective:
  args = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k != "name"}
  return build(d["name"], **args)
