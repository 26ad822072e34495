"""Per-cell embeddings: an ensemble's features at named layers, spatially mean-pooled.

For a trained ensemble (`cellrep.infer.trained.load`) or a randomly initialised one
(`random_init`: the baseline every representation must beat), and the cells of a
store:

- together: the crop's channels (the model's markers, matched by name, and the two
  masks) go through the model as in prediction; each named layer (``pool``,
  ``layer3``, ``block6a_activation``...) is mean-pooled over its spatial axes and the
  layers are concatenated, [cells, D];
- per channel (Microsnoop's way): each marker alone, as a one-channel image, goes
  through a one-channel model and the K embeddings are concatenated in channel order,
  [cells, K x D]. The channels ride along the batch axis: one program for all of them.

Members: the mean of the members' embeddings, or one member's. Cells are embedded a
batch at a time and handed back in chunks of at most `memory_budget` bytes
(`embed_store`), so a store of any size is embedded in bounded host memory; batches
are data-parallel over the mesh's devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import einops
import jax
import jax.numpy as jnp
import numpy as np

from cellrep import distributed
from cellrep.data.crops import CropSource
from cellrep.data.pipeline import data_sharding, eval_batches
from cellrep.data.store import Store
from cellrep.infer.predict import as_policy, device_outputs, make_ensemble_fn
from cellrep.infer.trained import Trained, store_preprocess
from cellrep.ops import policy as policy_lib
from cellrep.train.state import create_variables


def pool(features: dict[str, jax.Array], layers: Sequence[str]) -> jax.Array:
  """[B, sum of the layers' channels] float32: each layer mean-pooled over its spatial axes
  (all but the first and the last), concatenated in `layers` order."""
  pooled = []
  for name in layers:
    x = features[name].astype(jnp.float32)
    if x.ndim > 2:
      x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    pooled.append(x)
  return jnp.concatenate(pooled, axis=-1)


def make_embed_fn(model, preprocess: Callable, mesh, layers: Sequence[str],
                  policy: policy_lib.Policy | str = "auto", *, per_channel: int = 0) -> Callable:
  """(variables with member axis, crops [B, C, S, S]) -> features [M, B, D] float32.

  preprocess: crops -> network inputs [B, n, n, C']; per_channel: K > 0 feeds the first K
  channels of each input one at a time ([B * K, n, n, 1]) and concatenates their
  features in channel order, D = K x the layers' width.
  """
  policy = as_policy(policy, model)
  model = policy.predict_model(model)
  layers = tuple(layers)

  def member(variables, crops):
    x = preprocess(crops)
    if per_channel:
      x = einops.rearrange(x[..., :per_channel], "b h w k -> (b k) h w 1")
    _, features = model.apply(variables, x, train=False, capture=layers)
    out = pool(features, layers)
    if per_channel:
      out = einops.rearrange(out, "(b k) d -> b (k d)", k=per_channel)
    return out

  return make_ensemble_fn(member, mesh, policy)


@dataclasses.dataclass(frozen=True)
class Embedder:
  """How one ensemble embeds a store's cells: its jitted function and what comes out.

  names: the feature column names, ``<layer>_<i>`` (per channel ``<channel>_<layer>_<i>``).
  """
  trained: Trained
  fn: Callable
  names: tuple[str, ...]
  member: int  # -1: the mean over members


def layer_widths(trained: Trained, layers: Sequence[str], in_channels: int) -> list[int]:
  """The width of each pooled layer, from shapes alone; an unknown layer name is a BadValue
  naming the known ones (before any compile)."""
  shape = trained.input_shape[:3] + (in_channels,)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  one = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), trained.variables)
  _, feats = jax.eval_shape(lambda v, x: trained.model.apply(v, x, train=False,
                                                             capture=tuple(layers)), one, x)
  return [int(feats[n].shape[-1]) for n in layers]


def embedder(trained: Trained, store: Store, layers: Sequence[str], *, per_channel: bool = False,
             member: int = -1, **kwargs) -> Embedder:
  """The embedder of `store`'s cells by `trained` (kwargs: `store_preprocess`'s min_overlap,
  renames, scales). Per channel, the model takes one channel and `trained.channels` are the
  markers fed one at a time."""
  preprocess, _ = store_preprocess(trained, store, **kwargs)
  widths = layer_widths(trained, layers, 1 if per_channel else trained.input_shape[-1])
  flat = [f"{layer}_{i}" for layer, w in zip(layers, widths) for i in range(w)]
  names = ([f"{c}_{n}" for c in trained.channels for n in flat] if per_channel else flat)
  one = trained if member < 0 else trained.member(member)
  fn = make_embed_fn(one.model, preprocess, one.mesh, layers, one.policy,
                     per_channel=len(trained.channels) if per_channel else 0)
  return Embedder(one, fn, tuple(names), member)


def embed_store(e: Embedder, store: Store, indices: np.ndarray | None = None, *,
                batch_size: int = 256, threads: int = 8, memory_budget: int = 256 << 20
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Embeds rows `indices` of store.cells (default all), in order.

  Yields (row indices [n], features [n, D] float32) in chunks of at most `memory_budget`
  bytes of features (at least one batch).
  """
  trained = e.trained
  indices = np.arange(len(store.cells)) if indices is None else np.asarray(indices)
  data = trained.mesh.shape["data"]
  batch_size = -(-batch_size // data) * data
  rows_per_chunk = max(batch_size, memory_budget // (4 * max(len(e.names), 1)))
  sharding = data_sharding(trained.mesh)
  pending_idx, pending, held = [], [], 0
  batches = eval_batches(CropSource(store, trained.crop_size), indices, batch_size,
                         threads=threads, rows=distributed.local_rows(sharding, batch_size))
  for index, out in device_outputs(e.fn, trained.variables, batches, sharding):  # [M, B, D]
    keep = index >= 0
    pending_idx.append(index[keep])
    pending.append(out.mean(axis=0)[keep])
    held += int(keep.sum())
    if held >= rows_per_chunk:
      yield np.concatenate(pending_idx), np.concatenate(pending)
      pending_idx, pending, held = [], [], 0
  if pending:
    yield np.concatenate(pending_idx), np.concatenate(pending)


def random_like(trained: Trained, rng: jax.Array, *, in_channels: int | None = None,
                members: int | None = None) -> Trained:
  """The same ensemble (architecture, channels, sizes; its members, or `members`) with fresh
  random parameters drawn as a new run would draw them; `in_channels` changes the input
  width (1 per channel)."""
  shape = trained.input_shape[:3] + (in_channels or trained.input_shape[-1],)
  members = members or trained.members
  variables = create_variables(rng, trained.model, shape, members, trained.mesh)
  return dataclasses.replace(trained, variables=variables)

