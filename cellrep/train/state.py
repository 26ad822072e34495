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


def member_init_fn(model, tx: optax.GradientTransformation,
                   input_shape: tuple[int, ...]) -> Callable[[jax.Array], TrainState]:
  """key -> one member's TrainState (no member axis). input_shape: [B, H, W, C]."""

  def init(key):
    variables = model.init(key, jnp.zeros(input_shape, jnp.float32), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))

  return init


def member_sharding(mesh: Mesh) -> NamedSharding:
  """Leading member axis split over the mesh's `member` axis, the rest replicated."""
  return NamedSharding(mesh, P("member"))


def state_shardings(abstract_state, mesh: Mesh):
  return jax.tree.map(lambda _: member_sharding(mesh), abstract_state)


def create_state(rng: jax.Array, model, tx, input_shape, members: int, mesh: Mesh) -> TrainState:
  """Initialises `members` members (member m from fold_in(rng, m)) directly in their shardings.

  Shapes first, then shardings, then arrays: the state is materialised where it
  belongs instead of on one device and moved.
  """
  init = jax.vmap(member_init_fn(model, tx, input_shape))
  keys = jax.vmap(lambda m: jax.random.fold_in(rng, m))(jnp.arange(members))
  abstract = jax.eval_shape(init, keys)
  return jax.jit(init, out_shardings=state_shardings(abstract, mesh))(keys)


def abstract_state(model, tx, input_shape, members: int, mesh: Mesh):
  """ShapeDtypeStructs with shardings of the state `create_state` makes (for restoring)."""
  init = jax.vmap(member_init_fn(model, tx, input_shape))
  keys = jax.ShapeDtypeStruct((members,), jax.random.key(0).dtype)
  shapes = jax.eval_shape(init, keys)
  sharding = member_sharding(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
