"""Weights a user brings, for EfficientNet-B0: Keras HDF5 files and torchvision state_dicts.

Nothing is downloaded. `from_keras_h5(path)` reads the HDF5 layout Keras writes
(``model.save("x.h5")`` or ``save_weights``: a group per layer, listed in its
``layer_names`` attribute, each holding its ``weight_names``) with h5py, no
TensorFlow: the Cell Painting CNN checkpoint (DeepProfiler, an EfficientNet-B0 on 5
channels) and keras.applications' EfficientNetB0. `from_torchvision(state_dict)`
takes torchvision's ``efficientnet_b0().state_dict()`` (tensors or arrays). Both
return `Imported`: Flax variables for `cellrep.models.efficientnet` (whose module
names are Keras' layer names), the model arguments that reproduce the source network
(`spec`: torchvision pads stride-2 convolutions symmetrically and uses BatchNorm
epsilon 1e-5), and the input transform the source model applied itself (Keras
applications rescale by 1/255 and normalise inside the model; cellrep's models take
their input as it comes, so a caller applies `input_transform` to reproduce it).

`adapt_input_channels` makes a 3-channel first layer take C channels as DeepProfiler
does for ImageNet weights on Cell Painting images: the kernel averaged over its input
channels and repeated C times (``average``), or the RGB kernels tiled over the C
channels and scaled by 3 / C (``tile``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from cellrep.errors import BadValue, InputError
from cellrep.models import efficientnet

# Keras weight names (the last part of a weight's path, ":0" dropped) -> (collection, name).
_KERAS_WEIGHTS = {"kernel": ("params", "kernel"), "depthwise_kernel": ("params", "kernel"),
                  "bias": ("params", "bias"), "gamma": ("params", "scale"),
                  "beta": ("params", "bias"), "moving_mean": ("batch_stats", "mean"),
                  "moving_variance": ("batch_stats", "var")}
# The classifier's layer name in keras.applications, in qubvel's efficientnet, and in
# DeepProfiler's models (a Dense "ClassProb" on the pooled features).
_KERAS_CLASSIFIERS = ("predictions", "probs", "ClassProb")
ADAPT_METHODS = ("average", "tile")


@dataclasses.dataclass
class Imported:
  variables: dict             # {"params": ..., "batch_stats": ...}
  spec: dict                  # model arguments: {"name": "efficientnet_b0", ...}
  num_classes: int            # 0 when the file has no classifier (include_top=False)
  in_channels: int
  input_transform: dict | None = None  # {"scale": s, "mean": [C], "variance": [C]}: (x*s-mean)/sqrt(var)


def _module_path(layer: str) -> tuple[str, ...]:
  """Where Keras layer `layer` sits among the Flax modules: blocks nest under ``block<N><x>``."""
  m = re.match(r"(block\d+[a-z])_", layer)
  return (m.group(1), layer) if m else (layer,)


def _put(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _text(name) -> str:
  """An HDF5 attribute string (h5py gives bytes or str)."""
  return name.decode() if isinstance(name, bytes) else str(name)


def _keras_value(layer: str, name: str, value: np.ndarray) -> np.ndarray:
  # A DepthwiseConv2D's kernel (Keras 2: depthwise_kernel, Keras 3: kernel) is [kh, kw, C, 1];
  # as a grouped convolution's it is [kh, kw, 1, C].
  if layer.endswith("_dwconv") and name in ("kernel", "depthwise_kernel"):
    return np.transpose(value, (0, 1, 3, 2))
  return value


def from_keras_h5(path) -> Imported:
  """An EfficientNet-B0 from a Keras HDF5 file (full model or weights only)."""
  import h5py
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(path, "no such file", "a Keras .h5/.hdf5 file of an EfficientNet-B0")
  try:
    f = h5py.File(path, "r")
  except OSError:
    raise InputError(path, "not an HDF5 file", "a Keras .h5/.hdf5 file") from None
  with f:
    group = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in group.attrs:
      raise InputError(path, "no layer_names attribute: not the HDF5 layout Keras writes",
                       "a file from Keras' model.save('x.h5') or save_weights('x.h5')")
    variables: dict = {"params": {}, "batch_stats": {}}
    transform, num_classes = None, 0
    layers = [_text(n) for n in group.attrs["layer_names"]]
    for layer in layers:
      g = group[layer]
      names = [_text(n) for n in g.attrs.get("weight_names", [])]
      values = {n.split("/")[-1].split(":")[0]: np.asarray(g[n]) for n in names}
      if not values:
        continue
      if layer == "normalization" or layer.startswith("normalization_"):
        transform = {"scale": 1.0, "mean": values["mean"].reshape(-1),
                     "variance": values["variance"].reshape(-1)}
        continue
      target = "predictions" if layer in _KERAS_CLASSIFIERS else layer
      if target == "predictions":
        num_classes = int(values["kernel"].shape[-1])
      for name, value in values.items():
        if name not in _KERAS_WEIGHTS:
          raise InputError(path, f"layer {layer!r} has a weight {name!r}",
                           f"EfficientNet-B0 weights ({sorted(_KERAS_WEIGHTS)})")
        collection, leaf = _KERAS_WEIGHTS[name]
        _put(variables[collection], _module_path(target) + (leaf,), _keras_value(layer, name, value))
    if transform is not None and any("rescaling" in n for n in layers):
      transform["scale"] = 1.0 / 255.0  # keras.applications' Rescaling(1/255) before it
  in_channels = _in_channels(variables, path)
  spec = {"name": "efficientnet_b0", "padding": "same", "bn_epsilon": 1e-3, "bn_momentum": 0.99}
  return Imported(variables, spec, num_classes, in_channels, transform)


def _in_channels(variables: dict, source) -> int:
  try:
    return int(variables["params"]["stem_conv"]["kernel"].shape[2])
  except KeyError:
    raise InputError(source, "no stem_conv layer", "an EfficientNet-B0") from None


def _numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor, without importing torch
    x = x.detach().cpu().numpy()
  return np.asarray(x)


def _torch_conv(w: np.ndarray) -> np.ndarray:
  return np.transpose(w, (2, 3, 1, 0))  # [O, I/g, kh, kw] -> [kh, kw, I/g, O]


def from_torchvision(state_dict: Mapping[str, Any]) -> Imported:
  """An EfficientNet-B0 from torchvision's ``efficientnet_b0`` state_dict."""
  sd = {k: _numpy(v) for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  used: set[str] = set()
  variables: dict = {"params": {}, "batch_stats": {}}

  def take(key):
    if key not in sd:
      raise BadValue("state_dict", f"no {key!r}", "torchvision's efficientnet_b0 state_dict")
    used.add(key)
    return sd[key]

  def conv(torch_name, layer, bias=False):
    path = _module_path(layer)
    _put(variables["params"], path + ("kernel",), _torch_conv(take(f"{torch_name}.weight")))
    if bias:
      _put(variables["params"], path + ("bias",), take(f"{torch_name}.bias"))

  def norm(torch_name, layer):
    path = _module_path(layer)
    _put(variables["params"], path + ("scale",), take(f"{torch_name}.weight"))
    _put(variables["params"], path + ("bias",), take(f"{torch_name}.bias"))
    _put(variables["batch_stats"], path + ("mean",), take(f"{torch_name}.running_mean"))
    _put(variables["batch_stats"], path + ("var",), take(f"{torch_name}.running_var"))

  conv("features.0.0", "stem_conv")
  norm("features.0.1", "stem_bn")
  for s, (expand, _, _, _, repeats) in enumerate(efficientnet.B0_STAGES):
    for j in range(repeats):
      p, t = f"block{s + 1}{chr(ord('a') + j)}_", f"features.{s + 1}.{j}.block"
      k = 0
      if expand != 1:
        conv(f"{t}.0.0", f"{p}expand_conv")
        norm(f"{t}.0.1", f"{p}expand_bn")
        k = 1
      conv(f"{t}.{k}.0", f"{p}dwconv")
      norm(f"{t}.{k}.1", f"{p}bn")
      conv(f"{t}.{k + 1}.fc1", f"{p}se_reduce", bias=True)
      conv(f"{t}.{k + 1}.fc2", f"{p}se_expand", bias=True)
      conv(f"{t}.{k + 2}.0", f"{p}project_conv")
      norm(f"{t}.{k + 2}.1", f"{p}project_bn")
  conv("features.8.0", "top_conv")
  norm("features.8.1", "top_bn")
  num_classes = 0
  if "classifier.1.weight" in sd:
    _put(variables["params"], ("predictions", "kernel"), take("classifier.1.weight").T)
    _put(variables["params"], ("predictions", "bias"), take("classifier.1.bias"))
    num_classes = int(sd["classifier.1.weight"].shape[0])
  left = sorted(set(sd) - used)
  if left:
    raise BadValue("state_dict", f"{len(left)} entries not of EfficientNet-B0, first {left[0]!r}",
                   "torchvision's efficientnet_b0 state_dict")
  spec = {"name": "efficientnet_b0", "padding": "symmetric", "bn_epsilon": 1e-5, "bn_momentum": 0.9}
  return Imported(variables, spec, num_classes, _in_channels(variables, "state_dict"))


def from_file(path) -> Imported:
  """Weights from a file: Keras HDF5 (.h5, .hdf5) or a torchvision state_dict
  saved with `torch.save` (.pt, .pth; reading it needs PyTorch)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise InputError(path, "not found", "a Keras .h5 or a torchvision .pt/.pth weights file")
  if path.suffix.lower() in (".h5", ".hdf5"):
    return from_keras_h5(path)
  if path.suffix.lower() in (".pt", ".pth"):
    try:
      import torch
    except ImportError:
      raise InputError(path, "is a PyTorch file and PyTorch is not installed",
                       "PyTorch (the bench extra), or the weights as Keras HDF5") from None
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
      raise InputError(path, f"unreadable ({type(e).__name__}: {e})", "a torch.save'd state_dict") from None
    if not isinstance(state, Mapping):
      raise InputError(path, f"holds a {type(state).__name__}", "a state_dict (a dict of tensors)")
    return from_torchvision(state)
  raise InputError(path, f"unknown weights format {path.suffix!r}", "a .h5 (Keras) or .pt/.pth file")


def adapt_input_channels(imported: Imported, channels: int, method: str = "average") -> Imported:
  """`imported` with a first layer taking `channels` input channels (DeepProfiler's ImageNet
  initialisation of 5-channel models); the input transform is dropped (it was per RGB channel)."""
  if method not in ADAPT_METHODS:
    raise BadValue("method", f"unknown method {method!r}", f"one of {list(ADAPT_METHODS)}")
  if channels < 1:
    raise BadValue("channels", f"{channels}", "a number of channels ≥ 1")
  kernel = np.asarray(imported.variables["params"]["stem_conv"]["kernel"])  # [3, 3, C0, 32]
  c0 = kernel.shape[2]
  if method == "average":
    new = np.repeat(kernel.mean(axis=2, keepdims=True), channels, axis=2)
  else:
    new = kernel[:, :, np.arange(channels) % c0] * (c0 / channels)
  params = dict(imported.variables["params"], stem_conv={"kernel": new})
  return dataclasses.replace(imported, variables=dict(imported.variables, params=params),
                             in_channels=channels, input_transform=None)


def check_matches(imported: Imported, abstract_variables) -> None:
  """Raises `BadValue` naming the first parameter of `abstract_variables` (a model's
  init shapes) that `imported` lacks or has in another shape; extra entries also raise."""
  import jax
  want = {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_flatten_with_path(dict(abstract_variables))[0]}
  have = {jax.tree_util.keystr(k): np.shape(v)
          for k, v in jax.tree_util.tree_flatten_with_path(imported.variables)[0]}
  for key, shape in want.items():
    if key not in have:
      raise BadValue("weights", f"no {key}", "weights of the same model")
    if tuple(have[key]) != tuple(shape):
      raise BadValue("weights", f"{key} has shape {tuple(have[key])}", f"shape {tuple(shape)}")
  extra = sorted(set(have) - set(want))
  if extra:
    raise BadValue("weights", f"{len(extra)} entries the model does not have, first {extra[0]}",
                   "weights of the same model")
