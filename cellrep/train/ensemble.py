"""The ensemble train step `(state, batch, rng) -> (state, metrics)` and how its member axis runs.

Strategies for the member axis (all give the same result; tests check it):

- ``vmap``: `jax.vmap` over members inside one jitted program. With the model's
  convolutions as matrix products (`cellrep.ops.conv`, ``conv_impl="im2col"``,
  the CPU default) XLA sees batched matrix products over the member axis; with
  ``conv_impl="xla"`` it sees grouped convolutions, the fast path on GPU/TPU and
  a slow one on XLA:CPU. A single member runs its own program, without the vmap.
- ``map``: `jax.lax.map` over chunks of ``map_batch`` members inside one jitted
  program (a loop in HLO; each chunk vmapped). Memory of one chunk instead of M.
  With members sharded over devices, each device maps over its own members
  (`jax.shard_map` over the ``member`` mesh axis).
- ``loop``: a Python loop over one jitted single-member update that reads member
  m out of the stacked state and writes it back in place (the state is
  donated), so the state keeps its [M, ...] layout and one program serves all m.
- ``auto``: as the run's policy resolves it (`cellrep.ops.policy`): ``vmap`` on
  GPU/TPU. On a CPU, ``vmap`` when the saved activations of all members fit in the
  policy's `memory_budget` (30% of the machine's memory), else ``map`` over the
  largest chunk of members that fits (`plan_members`): one program either way
  (ResNet-50 at 60 px, batch 128, keeps 2.2 GiB of activations per member for its
  backward pass).

The step is parameterised by the model and an objective (`cellrep.train.objectives`:
what the loss, the metrics and the prediction are), so every job trains through it.
Member m's augmentation key at step s is fold_in(fold_in(rng, m), s), the same
under every strategy; the model's RNG streams (dropout, stochastic depth, masking:
`cellrep.models.RNG_STREAMS`) come from another key, derived alike.

The state is sharded over the mesh's ``member`` axis and the batch over its
``data`` axis; metrics come back as [M] arrays per name.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cellrep.models import RNG_STREAMS
from cellrep.ops import policy as policy_lib
from cellrep.train.objectives import Objective, SoftmaxCrossEntropy
from cellrep.train.state import TrainState, member_sharding

# Folded into the step's key for the model's own RNG streams (apart from augmentation's).
_MODEL_STREAM = 0x6D6F64


def make_mesh(member: int = 1, data: int = -1, devices=None) -> Mesh:
  """A ('member', 'data') mesh with Auto axes; -1 takes the devices that remain."""
  devices = list(devices if devices is not None else jax.devices())
  if data == -1:
    data = len(devices) // member
  if member < 1 or data < 1 or member * data > len(devices):
    raise ValueError(f"mesh {member}x{data} does not fit {len(devices)} devices")
  return jax.make_mesh((member, data), ("member", "data"),
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices[:member * data])


def member_key(rng: jax.Array, member, step) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(rng, member), step)


@dataclasses.dataclass(frozen=True)
class MemberStep:
  """One member's update. `preprocess(key, crops) -> images [B, H, W, C]` augments;
  `objective` scores the model's outputs (default: softmax cross-entropy on ``label``)."""
  model: Any
  tx: optax.GradientTransformation
  preprocess: Callable[[jax.Array, jax.Array], jax.Array]
  objective: Objective = SoftmaxCrossEntropy()

  def rngs(self, rng: jax.Array, member, step) -> dict[str, jax.Array]:
    """The model's RNG streams for this member and step."""
    key = member_key(jax.random.fold_in(rng, _MODEL_STREAM), member, step)
    return {name: jax.random.fold_in(key, i) for i, name in enumerate(RNG_STREAMS)}

  def loss(self, params, batch_stats, images, batch, rngs):
    """(loss, (metrics, new batch_stats)) of one member on images [B, H, W, C]."""
    outputs, updates = self.model.apply({"params": params, "batch_stats": batch_stats},
                                        images, train=True, mutable=["batch_stats"], rngs=rngs)
    loss, metrics = self.objective.loss(outputs, dict(batch, images=images))
    return loss, (metrics, updates.get("batch_stats", batch_stats))

  def __call__(self, state: TrainState, batch: dict, rng: jax.Array, member):
    """state: one member (no member axis); batch: crop [B, C, S, S] and the objective's
    targets (label [B] int32, ...)."""
    images = self.preprocess(member_key(rng, member, state.step), batch["crop"])
    (_, (metrics, batch_stats)), grads = jax.value_and_grad(self.loss, has_aux=True)(
        state.params, state.batch_stats, images, batch, self.rngs(rng, member, state.step))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
    return new_state, metrics

  def saved_bytes(self, abstract_state, batch) -> int:
    """Bytes of the activations one member keeps for its backward pass (shapes only, no compile).

    abstract_state: the stacked state (ShapeDtypeStructs, [M, ...]); batch: the batch's
    arrays or ShapeDtypeStructs.
    """
    one = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), abstract_state)

    def pullback(state, batch):
      images = self.preprocess(jax.random.key(0), batch["crop"])
      rngs = self.rngs(jax.random.key(0), 0, 0)
      return jax.vjp(lambda p: self.loss(p, state.batch_stats, images, batch, rngs)[0],
                     state.params)[1]

    shapes = jax.eval_shape(pullback, one, dict(batch))
    return int(sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize
                   for s in jax.tree.leaves(shapes) if hasattr(s, "shape")))


def plan_members(members: int, saved_bytes_per_member: int, budget_bytes: float,
                 devices_per_member_axis: int = 1) -> tuple[str, int]:
  """(``vmap``, M) when all members' saved activations fit `budget_bytes`, else (``map``, k).

  k is the largest divisor of the members per device whose saved activations fit
  (at least 1): equal chunks keep one program shape, no remainder program.
  """
  local = members // devices_per_member_axis
  fits = max(1, int(budget_bytes // max(saved_bytes_per_member, 1)))
  if fits >= local:
    return "vmap", local
  return "map", max(k for k in range(1, local + 1) if local % k == 0 and k <= fits)


@dataclasses.dataclass
class EnsembleStep:
  """The ensemble step and what `jax.jit` / AOT compilation need to build it.

  `fn(state, batch, rng) -> (state, metrics)`: one jitted program for ``vmap`` and
  ``map``, a Python loop over `member_fn` (one jitted single-member update) for ``loop``.
  """
  fn: Callable
  strategy: str
  in_shardings: Any
  out_shardings: Any
  donate_argnums: tuple[int, ...] = (0,)
  map_batch: int = 0                    # members per map iteration (``map``)
  member_fn: Callable | None = None     # ``loop``: (state, batch, rng, m) -> (state, metrics)
  members: int = 0
  # ``auto`` on a CPU built without a batch: batch -> the step planned for its shapes.
  plan: Callable[[dict], "EnsembleStep"] | None = None

  def __call__(self, state, batch, rng):
    return self.fn(state, batch, rng)

  def resolved(self, batch) -> "EnsembleStep":
    """The step that runs for batches shaped like `batch` (itself unless planned per batch)."""
    return self.plan(batch) if self.plan is not None else self

  def lower(self, state, batch, rng) -> list[tuple[jax.stages.Lowered, int]]:
    """The programs one step runs, lowered for these (abstract) arguments, with their call counts.

    `compile().cost_analysis()["flops"]` of each, times its count, is the step's FLOPs.
    """
    if self.plan is not None:
      return self.plan(batch).lower(state, batch, rng)
    if self.member_fn is not None:
      return [(self.member_fn.lower(state, batch, rng, jnp.int32(0)), self.members)]
    return [(self.fn.lower(state, batch, rng), 1)]


def make_train_step(member_step: MemberStep, mesh: Mesh, abstract_state,
                    policy: policy_lib.Policy | str = "auto", *, batch=None,
                    map_batch: int | None = None, memory_budget: float | None = None
                    ) -> EnsembleStep:
  """The jitted ensemble step for a stacked state shaped like `abstract_state`.

  policy: the run's `cellrep.ops.policy.Policy` (its strategy, map_batch, memory_budget and
    donation), or a strategy name resolved for this backend with `map_batch` and
    `memory_budget` (bytes the saved activations of an ``auto`` step may take on a CPU).
  batch: a batch (arrays or ShapeDtypeStructs) that a memory-planned step sizes its member
    chunks by; without it, the step plans at its first call, for that batch's shapes.
  """
  if isinstance(policy, str):
    policy = policy_lib.resolve(strategy=policy, map_batch=map_batch, memory_budget=memory_budget)
  members = int(jax.tree.leaves(abstract_state)[0].shape[0])
  state_sh = jax.tree.map(lambda _: member_sharding(mesh), abstract_state)
  batch_sh = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  metrics_sh = member_sharding(mesh)
  in_shardings = (state_sh, batch_sh, replicated)
  out_shardings = (state_sh, metrics_sh)
  if policy.memory_budget is not None and batch is None:
    planned: dict[tuple, EnsembleStep] = {}

    def plan(batch):
      key = tuple(sorted((k, tuple(v.shape)) for k, v in batch.items()))
      if key not in planned:
        planned[key] = make_train_step(member_step, mesh, abstract_state, policy, batch=batch)
      return planned[key]

    return EnsembleStep(lambda state, batch, rng: plan(batch)(state, batch, rng), "auto",
                        in_shardings, out_shardings, members=members, plan=plan)
  strategy, map_batch = policy.strategy, policy.map_batch
  if policy.memory_budget is not None:
    strategy, map_batch = plan_members(members, member_step.saved_bytes(abstract_state, batch),
                                       policy.memory_budget, mesh.shape["member"])
  ids = np.arange(members, dtype=np.int32)
  donate = (0,)

  if strategy == "vmap" and members == 1:
    # A vmap of one member keeps size-1 batch axes on every product, which XLA:CPU ran
    # 15-20% slower (ResNet-50) than the member's own program.
    if not policy.donate_single_member:
      # Donated, this program copied the parameters and both Adam moments every step on
      # XLA:CPU (its parameter update re-reads the old moments that the new ones overwrite
      # in place): a ResNet-50 step ran 6% faster writing a fresh state. Not so for ten
      # members, whose fresh state cost 17% (ResNet-18): they stay donated.
      donate = ()
    def step(state, batch, rng):
      one, metrics = member_step(jax.tree.map(lambda x: x[0], state), batch, rng, 0)
      return jax.tree.map(lambda x: x[None], (one, metrics))

  elif strategy == "vmap":
    def step(state, batch, rng):
      return jax.vmap(member_step, in_axes=(0, None, None, 0))(state, batch, rng, jnp.asarray(ids))

  elif strategy == "map":
    map_batch = map_batch or 1

    def map_members(state, batch, rng, ids):
      return jax.lax.map(lambda xs: member_step(xs[0], batch, rng, xs[1]), (state, ids),
                         batch_size=map_batch if map_batch > 1 else None)

    if mesh.shape["member"] > 1:
      # Each device maps over its own members; a scan over a sharded axis would gather it.
      map_members = jax.shard_map(map_members, mesh=mesh, axis_names={"member"},
                                  in_specs=(P("member"), P(), P(), P("member")),
                                  out_specs=(P("member"), P("member")))

    def step(state, batch, rng):
      return map_members(state, batch, rng, jnp.asarray(ids))

  else:  # loop
    def update_member(state, batch, rng, m):
      one = jax.tree.map(lambda x: x[m], state)
      one, metrics = member_step(one, batch, rng, m)
      return jax.tree.map(lambda x, y: x.at[m].set(y), state, one), metrics

    update = jax.jit(update_member, donate_argnums=(0,),
                     in_shardings=(state_sh, batch_sh, replicated, replicated),
                     out_shardings=(state_sh, replicated))

    def loop_step(state, batch, rng):
      per_member = []
      for m in range(members):
        state, metrics = update(state, batch, rng, jnp.int32(m))
        per_member.append(metrics)
      return state, jax.tree.map(lambda *xs: jnp.stack(xs), *per_member)

    return EnsembleStep(loop_step, strategy, in_shardings, out_shardings, member_fn=update,
                        members=members)

  fn = jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings,
               donate_argnums=donate)
  return EnsembleStep(fn, strategy, in_shardings, out_shardings, donate_argnums=donate,
                      map_batch=map_batch or 0, members=members)
