"""The ensemble train state: every leaf has a leading member axis [M, ...].

Members differ only by their initialisation seed (here) and their augmentation
RNG (in the step); they see the same host batches, as in CellSighter.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # [M] int32, equal across members
  params: Any              # leaves [M, ...]
  batch_stats: Any         # leaves [M, ...] (BatchNorm running statistics)
  opt_state: Any           # leaves [M, ...]

  @property
  def variables(self) -> dict:
    """Flax variables, still with the member axis."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def member_variables_fn(model, input_shape: tuple[int, ...]) -> Callable[[jax.Array], dict]:
  """key -> one member's Flax variables {"params", "batch_stats"} (no member axis).
  input_shape: [B, H, W, C]."""

  def init(key):
    variables = model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}

  return init


def member_init_fn(model, tx: optax.GradientTransformation,
                   input_shape: tuple[int, ...]) -> Callable[[jax.Array], TrainState]:
  """key -> one member's TrainState (no member axis). input_shape: [B, H, W, C]."""
  variables_fn = member_variables_fn(model, input_shape)

  def init(key):
    variables = variables_fn(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))

  return init


def member_sharding(mesh: Mesh) -> NamedSharding:
  """Leading member axis split over the mesh's `member` axis, the rest replicated."""
  return NamedSharding(mesh, P("member"))


def state_shardings(abstract_state, mesh: Mesh):
  return jax.tree.map(lambda _: member_sharding(mesh), abstract_state)


def _materialise(member_fn: Callable, rng: jax.Array, members: int, mesh: Mesh):
  """member_fn(fold_in(rng, m)) for every member m, stacked, made directly in its shardings.

  Shapes first, then shardings, then arrays: the state is materialised where it
  belongs instead of on one device and moved.
  """
  init = jax.vmap(member_fn)
  keys = jax.vmap(lambda m: jax.random.fold_in(rng, m))(jnp.arange(members))
  abstract = jax.eval_shape(init, keys)
  return jax.jit(init, out_shardings=state_shardings(abstract, mesh))(keys)


def _abstract(member_fn: Callable, members: int, mesh: Mesh):
  keys = jax.ShapeDtypeStruct((members,), jax.random.key(0).dtype)
  shapes = jax.eval_shape(jax.vmap(member_fn), keys)
  sharding = member_sharding(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def create_state(rng: jax.Array, model, tx, input_shape, members: int, mesh: Mesh) -> TrainState:
  """Initialises `members` members (member m from fold_in(rng, m)) in their shardings."""
  return _materialise(member_init_fn(model, tx, input_shape), rng, members, mesh)


def abstract_state(model, tx, input_shape, members: int, mesh: Mesh):
  """ShapeDtypeStructs with shardings of the state `create_state` makes (for restoring)."""
  return _abstract(member_init_fn(model, tx, input_shape), members, mesh)


def create_variables(rng: jax.Array, model, input_shape, members: int, mesh: Mesh) -> dict:
  """The Flax variables `create_state` would give its members (same rng, same values), with
  the member axis, and no optimizer state: a randomly initialised ensemble."""
  return _materialise(member_variables_fn(model, input_shape), rng, members, mesh)


def abstract_variables(model, input_shape, members: int, mesh: Mesh) -> dict:
  """ShapeDtypeStructs with shardings of `create_variables`' variables (for a partial restore)."""
  return _abstract(member_variables_fn(model, input_shape), members, mesh)
