"""The one backend policy of a run: how convolutions reach XLA, in which dtype, how members run.

A run resolves its `Policy` once (`resolve`), from what the config asks for and
the backend it finds, logs it in one line (`Policy.describe`), and hands it to the
train step, the predictor and the models: nothing above `cellrep.ops` asks which
backend it is on. What ``auto`` resolves to, and why:

- convolutions (`resolve_conv_impl`): ``xla`` on GPU/TPU. On a CPU, in float32,
  ``winograd`` to predict and to train on batches of `CPU_WINOGRAD_TRAIN_BATCH` or
  more, ``im2col`` to train on smaller ones: the float32 ResNet-50 ensemble predictor
  ran 12-16% faster with Winograd; a ResNet-50 train step 7% slower at batch 32 and
  8% faster at 128 (docs/performance.md). In bfloat16 ``im2col``: Winograd's
  transformed operands rounded to bfloat16 err 8x more (2.3% vs 0.29% relative RMS per
  3x3 layer) for a predictor only 0-5% faster.
- prediction dtype (`resolve_predict_dtype`): ``bfloat16`` where bfloat16 products
  are faster than float32 ones (`fast_bfloat16`: GPU/TPU, CPUs with AVX512-BF16 or
  AMX), else the model's own. Training keeps the model's dtype.
- member axis in training: ``vmap`` (one program). On a CPU it is planned from the
  saved activations (`memory_budget`, 30% of the host's memory): when all members'
  would not fit, ``lax.map`` over the largest chunk that does
  (`cellrep.train.ensemble.plan_members`). A single member on a CPU writes a fresh
  state instead of donating it (`donate_single_member`: XLA:CPU copied one member's
  parameters and Adam moments every step when donated; 6% of a ResNet-50 step).
- member axis in prediction: ``vmap`` on GPU/TPU; on a CPU ``map`` over one member at a
  time (`CPU_PREDICT_MAP_BATCH`): one ResNet-50 member at a time (float32, Winograd)
  ran 7-16% faster than chunks of 2 and 40% faster than all 10 vmapped; in bfloat16
  the three were within 3%.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from cellrep.errors import BadValue
from cellrep.ops import cpu

CONV_IMPLS = ("auto", "xla", "im2col", "winograd")
DTYPES = ("float32", "bfloat16")
PREDICT_DTYPES = ("auto",) + DTYPES
STRATEGIES = ("auto", "vmap", "map", "loop")

# The batch (per member) from which ``auto`` trains by Winograd on a CPU.
CPU_WINOGRAD_TRAIN_BATCH = 128
# Share of the host's memory the saved activations of one ``auto`` train step may take on a CPU.
CPU_MEMORY_FRACTION = 0.3
# Members per iteration of ``auto`` prediction on a CPU.
CPU_PREDICT_MAP_BATCH = 1


def platform() -> str:
  """The default backend's platform: ``cpu``, ``gpu`` or ``tpu``."""
  return jax.default_backend()


def dtype_name(dtype) -> str:
  """"float32" for float32 given any way (a name, a numpy or jax dtype); else str(dtype)."""
  try:
    return jnp.dtype(dtype).name
  except TypeError:
    return str(dtype)


def _choice(field: str, value, choices) -> None:
  if value not in choices:
    raise BadValue(field, f"unknown {field.replace('_', ' ')} {value!r}", f"one of {list(choices)}")


def fast_bfloat16(platform_name: str | None = None) -> bool:
  """Whether bfloat16 products run faster than float32 ones: on GPU/TPU, and on a CPU with
  one of `cpu.BF16_FLAGS`."""
  if (platform_name or platform()) != "cpu":
    return True
  return cpu.has_bf16_dot()


def resolve_conv_impl(impl: str, platform_name: str | None = None, inference: bool = False,
                      batch: int | None = None, dtype: Any = jnp.float32) -> str:
  """``auto`` -> ``xla`` off CPU; on a CPU, in float32, ``winograd`` for `inference` or a
  `batch` of at least `CPU_WINOGRAD_TRAIN_BATCH` images, else ``im2col``; in bfloat16
  ``im2col``. Other names pass through (checked)."""
  _choice("conv_impl", impl, CONV_IMPLS)
  if impl != "auto":
    return impl
  if (platform_name or platform()) != "cpu":
    return "xla"
  if jnp.dtype(dtype) == jnp.bfloat16:
    return "im2col"
  large = batch is not None and batch >= CPU_WINOGRAD_TRAIN_BATCH
  return "winograd" if inference or large else "im2col"


def resolve_predict_dtype(dtype: str, model_dtype: Any = "float32",
                          platform_name: str | None = None) -> str:
  """The compute dtype of prediction: ``auto`` -> ``bfloat16`` where bfloat16 products are
  faster (`fast_bfloat16`), else the model's own; other names pass through (checked).
  Parameters stay float32, products accumulate in float32 either way."""
  _choice("predict_dtype", dtype, PREDICT_DTYPES)
  if dtype != "auto":
    return dtype
  return "bfloat16" if fast_bfloat16(platform_name) else jnp.dtype(model_dtype).name


@dataclasses.dataclass(frozen=True)
class Policy:
  """Every backend-dependent choice of a run, resolved (no ``auto`` left but `strategy`'s plan).

  strategy: the member axis of the train step, ``vmap``, ``map`` or ``loop``; with a
    `memory_budget` a ``vmap`` becomes a ``map`` over member chunks when all members'
    saved activations exceed it (planned per batch shape).
  map_batch: members per iteration of a ``map`` train step (0: the planner's or 1).
  """
  platform: str = "cpu"
  conv_impl: str = "im2col"
  dtype: str = "float32"
  strategy: str = "vmap"
  map_batch: int = 0
  memory_budget: float | None = None
  donate_single_member: bool = True
  predict_conv_impl: str = "xla"
  predict_dtype: str = "float32"
  predict_strategy: str = "vmap"
  predict_map_batch: int = 1

  def describe(self) -> str:
    """The policy in one line, for the run log."""
    budget = ("" if self.memory_budget is None else
              f", chunked to fit {self.memory_budget / 2**30:.1f} GiB of activations")
    chunk = f" of {self.map_batch}" if self.strategy == "map" and self.map_batch else ""
    pchunk = f" of {self.predict_map_batch}" if self.predict_strategy == "map" else ""
    return (f"backend policy: {self.platform}; train: {self.conv_impl} convolutions, {self.dtype}, "
            f"members by {self.strategy}{chunk}{budget}; predict: {self.predict_conv_impl} "
            f"convolutions, {self.predict_dtype}, members by {self.predict_strategy}{pchunk}")

  def _clone(self, model, conv_impl: str, dtype: str):
    """`model` with these settings, for the fields it has (a model without them runs as it is)."""
    fields = {k: v for k, v in (("conv_impl", conv_impl), ("dtype", jnp.dtype(dtype)))
              if hasattr(model, k)}
    return model.clone(**fields) if fields else model

  def train_model(self, model):
    """`model` as it trains under this policy."""
    return self._clone(model, self.conv_impl, self.dtype)

  def predict_model(self, model):
    """`model` as it predicts under this policy."""
    return self._clone(model, self.predict_conv_impl, self.predict_dtype)


def resolve(*, conv_impl: str = "auto", dtype: str = "float32", predict_dtype: str = "auto",
            strategy: str = "auto", predict_strategy: str = "auto", batch: int | None = None,
            map_batch: int | None = None, predict_map_batch: int | None = None,
            memory_budget: float | None = None, platform_name: str | None = None) -> Policy:
  """The policy for these requests on this backend (`platform_name`: the default backend's).

  conv_impl, dtype: the model's (config.model); batch: the train step's batch, which
    ``auto`` convolutions train by; predict_dtype: config.predict.dtype.
  strategy, predict_strategy: the member axis in training and prediction.
  map_batch, predict_map_batch: members per ``map`` iteration (default: the planner's, 1).
  memory_budget: bytes of saved activations an ``auto`` train step may take on a CPU
    (default `CPU_MEMORY_FRACTION` of the host's memory).
  """
  name = platform_name or platform()
  _choice("conv_impl", conv_impl, CONV_IMPLS)
  dtype = dtype_name(dtype)
  _choice("dtype", dtype, DTYPES)
  _choice("strategy", strategy, STRATEGIES)
  _choice("predict_strategy", predict_strategy, STRATEGIES)
  pdtype = resolve_predict_dtype(predict_dtype, dtype, name)
  on_cpu = name == "cpu"
  budget = None
  if strategy == "auto" and on_cpu:
    budget = memory_budget if memory_budget is not None else (
        CPU_MEMORY_FRACTION * cpu.host_memory_bytes())
  pstrategy, pmap = predict_strategy, predict_map_batch or 1
  if predict_strategy == "auto":
    pstrategy, pmap = ("map", predict_map_batch or CPU_PREDICT_MAP_BATCH) if on_cpu else ("vmap", 1)
  return Policy(
      platform=name,
      conv_impl=resolve_conv_impl(conv_impl, name, batch=batch, dtype=dtype),
      dtype=dtype,
      strategy="vmap" if strategy == "auto" else strategy,
      map_batch=map_batch or 0,
      memory_budget=budget,
      donate_single_member=not on_cpu,
      predict_conv_impl=resolve_conv_impl(conv_impl, name, inference=True, dtype=pdtype),
      predict_dtype=pdtype,
      predict_strategy=pstrategy,
      predict_map_batch=pmap)
