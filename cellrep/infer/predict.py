"""Ensemble prediction: per-member class probabilities, their mean, argmax class and confidence.

CellSighter's rule: the ensemble's probability is the mean of the members'
softmax outputs, its class the argmax and its confidence the max of that mean.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cellrep.data.pipeline import to_device
from cellrep.models.conv import fast_bfloat16, resolve_conv_impl
from cellrep.train.ensemble import resolve_strategy
from cellrep.train.state import member_sharding


# Members per iteration of ``auto`` prediction on a CPU: one ResNet-50 member at a time
# (float32, Winograd convolutions) ran 7-16% faster than chunks of 2 and 40% faster than
# all 10 vmapped at once (benchmarks/bench_inference.py), with the activation memory of
# one; in bfloat16 (im2col) the three were within 3% of each other (batch 128 and 256).
CPU_PREDICT_MAP_BATCH = 1

DTYPES = ("auto", "float32", "bfloat16")


def resolve_dtype(dtype: str, model_dtype: Any = "float32", backend: str | None = None) -> str:
  """The compute dtype of prediction: ``auto`` -> ``bfloat16`` where bfloat16 products are
  faster (`fast_bfloat16`: GPU/TPU, CPUs with AVX512-BF16 or AMX), else the model's own;
  other names pass through (checked). Parameters stay float32, products accumulate in
  float32 and the softmax runs in float32 either way."""
  if dtype not in DTYPES:
    raise ValueError(f"unknown prediction dtype {dtype!r}; known: {DTYPES}")
  if dtype != "auto":
    return dtype
  return "bfloat16" if fast_bfloat16(backend) else jnp.dtype(model_dtype).name


def make_predict_fn(model, preprocess: Callable[[jax.Array], jax.Array], mesh: Mesh,
                    strategy: str = "auto", *, map_batch: int = 1, dtype: str = "auto"
                    ) -> Callable:
  """(variables with member axis, crops [B, C, S, S]) -> probabilities [M, B, classes] float32.

  strategy: the member axis as in `cellrep.train.ensemble`: ``vmap`` one program over
  all members, ``map`` one program looping over chunks of `map_batch` members, ``loop``
  a Python loop over one jitted member; ``auto`` is ``vmap`` on GPU/TPU and ``map``
  over chunks of `CPU_PREDICT_MAP_BATCH` members on a CPU. With the model's
  convolutions as matrix products (conv_impl ``auto`` on a CPU) the members of a
  chunk run batched matrix products.

  dtype: the model's compute dtype here (`resolve_dtype`; ``auto``: bfloat16 where its
  products are faster). A model with conv_impl ``auto`` predicts with `resolve_conv_impl`'s
  inference choice for that dtype (on a CPU: Winograd 3x3 convolutions in float32, im2col
  in bfloat16). The bfloat16 ResNet-50 predictor on an AVX512-BF16 CPU ran 1.5x the
  float32 one, its logits within ~0.5% (relative RMS) of float32's (README, Performance).
  """
  if hasattr(model, "dtype"):
    model = model.clone(dtype=jnp.dtype(resolve_dtype(dtype, model.dtype)))
  if getattr(model, "conv_impl", None) == "auto":
    model = model.clone(conv_impl=resolve_conv_impl("auto", inference=True,
                                                    dtype=getattr(model, "dtype", jnp.float32)))
  if strategy == "auto" and jax.default_backend() == "cpu":
    strategy, map_batch = "map", CPU_PREDICT_MAP_BATCH
  strategy = resolve_strategy(strategy)
  batch_sh = NamedSharding(mesh, P("data"))

  def member_probs(variables, crops):
    logits = model.apply(variables, preprocess(crops), train=False)
    return jax.nn.softmax(logits, axis=-1)

  if strategy in ("vmap", "map"):
    if strategy == "vmap":
      fn = jax.vmap(member_probs, in_axes=(0, None))
    else:
      def fn(variables, crops):
        # batch_size=1 would add a size-1 axis to every array and copy all members' weights.
        return jax.lax.map(lambda v: member_probs(v, crops), variables,
                           batch_size=map_batch if map_batch > 1 else None)
    return jax.jit(fn, in_shardings=(member_sharding(mesh), batch_sh),
                   out_shardings=NamedSharding(mesh, P("member", "data")))

  # loop: one compiled single-member program, member index dynamic.
  one = jax.jit(lambda variables, crops, m: member_probs(jax.tree.map(lambda x: x[m], variables),
                                                         crops))

  def loop(variables, crops):
    members = jax.tree.leaves(variables)[0].shape[0]
    return jnp.stack([one(variables, crops, jnp.int32(m)) for m in range(members)])

  return loop


def predict(variables, predict_fn: Callable, batches: Iterable[dict], data_sharding
            ) -> tuple[np.ndarray, np.ndarray]:
  """Runs `predict_fn` over host batches (padding has index -1).

  Returns (indices [N] int64, member probabilities [N, M, classes] float32).
  """
  indices, probs = [], []
  for batch in batches:
    keep = batch["index"] >= 0
    out = np.asarray(predict_fn(variables, to_device(batch, data_sharding)["crop"]))
    indices.append(batch["index"][keep])
    probs.append(np.transpose(out, (1, 0, 2))[keep])
  return np.concatenate(indices), np.concatenate(probs)


def ensemble(member_probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """member_probs [N, M, C] -> (mean probabilities [N, C], class [N], confidence [N])."""
  mean = member_probs.mean(axis=1)
  return mean, mean.argmax(axis=1), mean.max(axis=1)


def predictions_table(cells: pd.DataFrame, classes, member_probs: np.ndarray) -> pd.DataFrame:
  """One row per cell of `cells` (rows aligned with member_probs).

  Columns: cell_id, fov, fov_name, label, pred, confidence, prob_<class> per class,
  plus the cells' Metadata_* columns.
  """
  mean, pred, conf = ensemble(member_probs)
  classes = list(classes)
  out = pd.DataFrame({
      "cell_id": cells.cell_id.to_numpy(),
      "fov": cells.fov.to_numpy(),
      "fov_name": cells.fov_name.to_numpy(),
      "label": cells.label.to_numpy(),
      "pred": pd.array([classes[i] for i in pred], dtype="string"),
      "confidence": conf.astype(np.float32),
  })
  for i, c in enumerate(classes):
    out[f"prob_{c}"] = mean[:, i].astype(np.float32)
  for col in cells.columns:
    if col.startswith("Metadata_"):
      out[col] = cells[col].to_numpy()
  return out


def cellsighter_csv(predictions: pd.DataFrame, classes) -> pd.DataFrame:
  """CellSighter's results CSV: pred, pred_prob, label, cell_id, image_id, prob_list.

  Classes are integer ids (index into `classes`), -1 for unlabelled, as CellSighter writes.
  """
  index = {c: i for i, c in enumerate(classes)}
  probs = predictions[[f"prob_{c}" for c in classes]].to_numpy()
  return pd.DataFrame({
      "pred": [index[p] for p in predictions.pred],
      "pred_prob": predictions.confidence.to_numpy(),
      "label": [index.get(l, -1) if isinstance(l, str) else -1 for l in predictions.label],
      "cell_id": predictions.cell_id.to_numpy(),
      "image_id": predictions.fov_name.to_numpy(),
      "prob_list": [str(list(map(float, p))) for p in probs],
  })
