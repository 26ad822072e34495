"""Models: Flax modules used through pure `init`/`apply`, built by name from keyword arguments.

`build(config.model, num_classes=...)` takes a ``name`` plus that model's own
arguments (as big_vision builds ``models.<name>.Model(**config.model)``): each
``cellrep/models/<file>.py`` exposes ``MODELS``, names -> a function of keyword
arguments returning the Flax module, which checks its arguments itself (`BadValue`
naming the argument; a task maps it to ``model.<argument>``). `register` adds one more.

Every model is called as ``model.apply(variables, x [B, H, W, C], train=...,
capture=(names...), rngs=...)``: ``capture`` returns ``(output, {name: feature})``
(`cellrep.models.layers.Taps`); ``train`` switches BatchNorm statistics, dropout and the
like; ``rngs`` carries the streams of `RNG_STREAMS` a model may draw from in training.
Models that have ``conv_impl`` and ``dtype`` fields get them from the run's policy
(`cellrep.ops.policy.Policy.train_model` / ``predict_model``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

from cellrep.errors import BadValue

# Files of cellrep.models that hold built-in models (their MODELS).
_FILES = ("resnet", "efficientnet", "masked_autoencoder")
# The RNG streams the train step gives every model (each member and step its own keys).
RNG_STREAMS = ("dropout", "drop_path", "mask")

_registry: dict[str, Callable[..., Any]] = {}


def _load() -> dict[str, Callable[..., Any]]:
  if not _registry:
    for file in _FILES:
      _registry.update(importlib.import_module(f"cellrep.models.{file}").MODELS)
  return _registry


def register(name: str, factory: Callable[..., Any]) -> None:
  """Makes `build({"name": name, ...})` call ``factory(**kwargs)`` (or ``factory(name=name,
  **kwargs)`` when it takes a ``name``)."""
  _load()[name] = factory


def names() -> tuple[str, ...]:
  return tuple(sorted(_load()))


def accepts(name: str, argument: str) -> bool:
  """Whether model `name` takes `argument` (``num_classes``: a classifier; a reconstruction
  model has none)."""
  registry = _load()
  if name not in registry:
    raise BadValue("name", f"unknown model {name!r}", f"one of {sorted(registry)}")
  params = inspect.signature(registry[name]).parameters
  return argument in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build(spec, **overrides):
  """The Flax module of ``spec["name"]`` with the rest of `spec` and `overrides` as arguments.

  spec: a dict or ConfigDict (config.model) with ``name``; overrides: arguments the data
  decides (``num_classes``) or the policy (``conv_impl``), taking precedence.
  """
  kwargs = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
  kwargs.update(overrides)
  name = kwargs.pop("name", None)
  registry = _load()
  if name not in registry:
    raise BadValue("name", f"unknown model {name!r}", f"one of {sorted(registry)}")
  factory = registry[name]
  params = inspect.signature(factory).parameters
  if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
    known = [p for p in params if p != "name"]
    for key in kwargs:
      if key not in known:
        raise BadValue(key, f"not an argument of model {name!r}", f"one of {known}")
  if "name" in params:
    kwargs["name"] = name
  return factory(**kwargs)
