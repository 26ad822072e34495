"""Ensemble prediction: per-member outputs of the objective, their mean, argmax class and confidence.

CellSighter's rule: the ensemble's probability is the mean of the members'
softmax outputs, its class the argmax and its confidence the max of that mean.
`make_ensemble_fn` runs any per-member function over the member axis as the policy
says; the predictor and the embedding path (`cellrep.infer.embed`) are two uses.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cellrep import distributed
from cellrep.data.pipeline import to_device
from cellrep.ops import policy as policy_lib
from cellrep.train.objectives import Objective, SoftmaxCrossEntropy
from cellrep.train.state import member_sharding


def as_policy(policy: policy_lib.Policy | str, model, map_batch: int | None = None,
              dtype: str | None = None) -> policy_lib.Policy:
  """The run's policy, or one resolved here for `model` from a strategy name (with these
  members per map iteration and prediction dtype)."""
  if not isinstance(policy, str):
    return policy
  dtype_of_model = getattr(model, "dtype", None)
  return policy_lib.resolve(conv_impl=getattr(model, "conv_impl", "auto"),
                            dtype="float32" if dtype_of_model is None else dtype_of_model,
                            predict_dtype=dtype or "auto", predict_strategy=policy,
                            predict_map_batch=map_batch)


def make_ensemble_fn(member_fn: Callable, mesh: Mesh, policy: policy_lib.Policy) -> Callable:
  """(variables with member axis, crops [B, ...]) -> member_fn's output with a member axis
  [M, B, ...], the member axis run as `policy.predict_strategy` says.

  ``vmap``: one program over all members; ``map``: one program looping over chunks of
  `policy.predict_map_batch` members; ``loop``: a Python loop over one jitted member.
  Outputs are placed [member, data] over the mesh.
  """
  batch_sh = NamedSharding(mesh, P("data"))
  strategy, map_batch = policy.predict_strategy, policy.predict_map_batch
  if strategy in ("vmap", "map"):
    if strategy == "vmap":
      fn = jax.vmap(member_fn, in_axes=(0, None))
    else:
      def fn(variables, crops):
        # batch_size=1 would add a size-1 axis to every array and copy all members' weights.
        return jax.lax.map(lambda v: member_fn(v, crops), variables,
                           batch_size=map_batch if map_batch > 1 else None)
    return jax.jit(fn, in_shardings=(member_sharding(mesh), batch_sh),
                   out_shardings=NamedSharding(mesh, P("member", "data")))

  # loop: one compiled single-member program, member index dynamic.
  one = jax.jit(lambda variables, crops, m: member_fn(jax.tree.map(lambda x: x[m], variables),
                                                      crops))

  def loop(variables, crops):
    members = jax.tree.leaves(variables)[0].shape[0]
    return jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[one(variables, crops, jnp.int32(m)) for m in range(members)])

  return loop


def make_predict_fn(model, preprocess: Callable[[jax.Array], jax.Array], mesh: Mesh,
                    policy: policy_lib.Policy | str = "auto", *, map_batch: int | None = None,
                    dtype: str | None = None, objective: Objective | None = None) -> Callable:
  """(variables with member axis, crops [B, C, S, S]) -> per-example outputs [M, B, ...]
  float32: the objective's prediction (default: softmax probabilities [M, B, classes]).

  policy: the run's `cellrep.ops.policy.Policy`, or a strategy name (``auto``, ``vmap``,
  ``map``, ``loop``) resolved here with `map_batch` and the prediction `dtype` (``auto``:
  bfloat16 where its products are faster). The model predicts as `Policy.predict_model`
  makes it: its compute dtype and convolutions (on a CPU: Winograd 3x3 convolutions in
  float32, im2col in bfloat16). The bfloat16 ResNet-50 predictor on an AVX512-BF16 CPU
  ran 1.5x the float32 one, its logits within ~0.5% (relative RMS) of float32's
  (docs/performance.md).
  """
  policy = as_policy(policy, model, map_batch, dtype)
  model = policy.predict_model(model)
  objective = objective or SoftmaxCrossEntropy()

  def member_outputs(variables, crops):
    return objective.predict(model.apply(variables, preprocess(crops), train=False))

  return make_ensemble_fn(member_outputs, mesh, policy)


def predict(variables, predict_fn: Callable, batches: Iterable[dict], data_sharding
            ) -> tuple[np.ndarray, np.ndarray]:
  """Runs `predict_fn` over host batches (this process's rows of each; padding has index -1).

  Returns (indices [N] int64, member outputs [N, M, ...] float32: probabilities [N, M,
  classes] for a classifier), the same whole result on every process of a run.
  """
  indices, probs = [], []
  for index, out in device_outputs(predict_fn, variables, batches, data_sharding):
    keep = index >= 0
    indices.append(index[keep])
    probs.append(np.swapaxes(out, 0, 1)[keep])  # [B, M, ...]
  return np.concatenate(indices), np.concatenate(probs)


def device_outputs(fn: Callable, variables, batches: Iterable[dict], data_sharding
                   ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(global batch's indices [B], fn(variables, crops) [M, B, ...] as numpy) per host batch:
  each process feeds its rows, every process gets the whole batch's outputs."""
  for batch in batches:
    on_device = to_device(batch, data_sharding, keys=("crop", "index"))
    out = fn(variables, on_device["crop"])
    # The index travels as int32 (x64 is off): row numbers of stores under 2**31 cells.
    yield distributed.to_host(on_device["index"]).astype(np.int64), distributed.to_host(out)


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
