"""The ensemble train step `(state, batch, rng) -> (state, metrics)` and how its member axis runs.

Strategies for the member axis (all give the same result; tests check it):

- ``vmap``: `jax.vmap` over members inside one jitted program. The fast path on
  GPU/TPU. On XLA:CPU a convolution vmapped over its weights becomes a grouped
  convolution, measured 4-9x slower than a loop.
- ``map``: `jax.lax.map` over members inside one jitted program (a sequential
  loop in HLO, no grouped convolutions).
- ``loop``: a Python loop over one jitted single-member update that reads member
  m out of the stacked state and writes it back in place (the state is
  donated), so the state keeps its [M, ...] layout and one program serves all m.
- ``auto``: ``loop`` on CPU, ``vmap`` elsewhere.

Member m's augmentation key at step s is fold_in(fold_in(rng, m), s), the same
under every strategy.

The state is sharded over the mesh's ``member`` axis and the batch over its
``data`` axis; metrics come back as [M] arrays per name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cellrep.train.losses import cross_entropy
from cellrep.train.state import TrainState, member_sharding

STRATEGIES = ("auto", "vmap", "map", "loop")


def resolve_strategy(strategy: str, backend: str | None = None) -> str:
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; known: {STRATEGIES}")
  if strategy != "auto":
    return strategy
  return "loop" if (backend or jax.default_backend()) == "cpu" else "vmap"


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
  """One member's update. `preprocess(key, crops) -> images [B, H, W, C]` augments."""
  model: Any
  tx: optax.GradientTransformation
  preprocess: Callable[[jax.Array, jax.Array], jax.Array]
  label_smoothing: float = 0.0

  def __call__(self, state: TrainState, batch: dict, rng: jax.Array, member):
    """state: one member (no member axis); batch: crop [B, C, S, S], label [B] int32."""
    images = self.preprocess(member_key(rng, member, state.step), batch["crop"])
    labels = batch["label"]

    def loss_fn(params):
      logits, updates = self.model.apply({"params": params, "batch_stats": state.batch_stats},
                                         images, train=True, mutable=["batch_stats"])
      return cross_entropy(logits, labels, self.label_smoothing), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
        "grad_norm": optax.tree.norm(grads),
    }
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state)
    return new_state, metrics


@dataclasses.dataclass
class EnsembleStep:
  """The ensemble step and what `jax.jit` / AOT compilation need to build it.

  `fn(state, batch, rng) -> (state, metrics)`; for ``vmap``/``map`` it is one jitted
  program (`lower` gives its HLO and cost analysis); for ``loop`` a Python loop.
  """
  fn: Callable
  strategy: str
  in_shardings: Any
  out_shardings: Any
  donate_argnums: tuple[int, ...] = (0,)

  def __call__(self, state, batch, rng):
    return self.fn(state, batch, rng)


def make_train_step(member_step: MemberStep, mesh: Mesh, abstract_state, strategy: str = "auto"
                    ) -> EnsembleStep:
  """The jitted ensemble step for a stacked state shaped like `abstract_state`."""
  strategy = resolve_strategy(strategy)
  members = int(jax.tree.leaves(abstract_state)[0].shape[0])
  state_sh = jax.tree.map(lambda _: member_sharding(mesh), abstract_state)
  batch_sh = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  metrics_sh = member_sharding(mesh)
  in_shardings = (state_sh, batch_sh, replicated)
  out_shardings = (state_sh, metrics_sh)
  ids = np.arange(members, dtype=np.int32)

  if strategy == "vmap":
    def step(state, batch, rng):
      return jax.vmap(member_step, in_axes=(0, None, None, 0))(state, batch, rng, jnp.asarray(ids))

  elif strategy == "map":
    def step(state, batch, rng):
      return jax.lax.map(lambda xs: member_step(xs[0], batch, rng, xs[1]),
                         (state, jnp.asarray(ids)))

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

    return EnsembleStep(loop_step, strategy, in_shardings, out_shardings)

  fn = jax.jit(step, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=(0,))
  return EnsembleStep(fn, strategy, in_shardings, out_shardings)
