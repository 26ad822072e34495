"""PyTorch baselines the benchmarks time beside cellrep: torchvision's networks on the same crops.

`resnet(name, channels, classes)` is torchvision's network with `conv1` taking `channels`
inputs (7x7, stride 2, as cellrep's ImageNet stem), in `channels_last` memory format, all
cores (`torch.set_num_threads(os.cpu_count())`). On it:

- `predict_case`: `eval()`, `torch.inference_mode()` (bench_inference.py);
- `train_case`: `train()`, forward + cross-entropy + backward + Adam step (bench_ensemble.py).

`efficientnet(channels, classes)` is torchvision's `efficientnet_b0(num_classes=classes)`
(dropout 0.2, stochastic depth 0.2) with its stem convolution (3x3, stride 2) taking
`channels` inputs, channels_last, all cores (bench_efficientnet.py). An ensemble of M is M
such networks run one after the other in a Python loop:

- `efficientnet_train_case`: forward + cross-entropy + backward + SGD-Nesterov step per network;
- `efficientnet_features_case`: `eval()`, `torch.inference_mode()`, the network up to
  ``block6a``'s activation (the Cell Painting CNN's features: its depthwise convolution's
  BatchNorm and SiLU), mean-pooled over space.

dtype ``bfloat16`` runs under `torch.autocast("cpu", torch.bfloat16)` (oneDNN's bf16
convolutions on CPUs that have them; parameters and Adam stay float32), ``float32`` without.
Every case returns ``(run, info)``, `run()` doing one batch to completion (CPU torch is
synchronous), or None when torch or torchvision is not installed (the `bench` extra).
"""

from __future__ import annotations

import importlib.util
import os

DTYPES = ("float32", "bfloat16")
# Case name in the benchmarks' JSON: dtype ("torch" is float32, as the issues name it).
CASES = {"torch": "float32", "torch_bf16": "bfloat16"}


def available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "torchvision"))


def resnet(name: str, channels: int, classes: int):
  """torchvision's `name` (resnet18, resnet50, ...) on [N, channels, H, W] inputs, channels_last."""
  import torch
  import torchvision

  torch.set_num_threads(os.cpu_count())
  net = getattr(torchvision.models, name)(num_classes=classes)
  net.conv1 = torch.nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
  return net.to(memory_format=torch.channels_last)


def _info(name: str, dtype: str) -> dict:
  import torch
  return {"model": name, "torch_threads": torch.get_num_threads(),
          "mkldnn": torch.backends.mkldnn.is_available(), "memory_format": "channels_last",
          "dtype": dtype}


def _check(dtype: str) -> None:
  if dtype not in DTYPES:
    raise ValueError(f"dtype {dtype!r}: expected one of {DTYPES}")


def predict_case(images, name: str, classes: int, dtype: str = "float32"):
  """(run, info): `run()` predicts images [N, C, H, W] float32 (numpy), or None without torch."""
  _check(dtype)
  if not available():
    return None
  import torch

  net = resnet(name, images.shape[1], classes).eval()
  x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)

  def run():
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16,
                                                enabled=dtype == "bfloat16"):
      net(x)

  run()
  return run, _info(name, dtype)


def train_case(crops, labels, name: str, classes: int, dtype: str = "float32", lr: float = 1e-3):
  """(run, info): `run()` is one train step on crops [N, C, H, W] float32 and labels [N] (numpy).

  Forward, softmax cross-entropy, backward and `torch.optim.Adam(lr)`, the batch as it
  comes (no augmentation); None without torch."""
  _check(dtype)
  if not available():
    return None
  import torch

  net = resnet(name, crops.shape[1], classes).train()
  opt = torch.optim.Adam(net.parameters(), lr=lr)
  x = torch.from_numpy(crops).contiguous(memory_format=torch.channels_last)
  y = torch.from_numpy(labels).long()

  def run():
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
      loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    opt.step()

  run()
  return run, dict(_info(name, dtype), optimizer=f"Adam(lr={lr})")


def efficientnet(channels: int, classes: int):
  """torchvision's `efficientnet_b0(num_classes=classes)` on [N, channels, H, W], channels_last."""
  import torch
  import torchvision

  torch.set_num_threads(os.cpu_count())
  net = torchvision.models.efficientnet_b0(num_classes=classes)
  stem = net.features[0][0]
  net.features[0][0] = torch.nn.Conv2d(channels, stem.out_channels, kernel_size=3, stride=2,
                                       padding=1, bias=False)
  return net.to(memory_format=torch.channels_last)


def efficientnet_train_case(crops, labels, classes: int, dtype: str = "float32", members: int = 1,
                            lr: float = 0.01, momentum: float = 0.9):
  """(run, info): `run()` is one train step of each of `members` networks on crops
  [N, C, H, W] float32 and labels [N] (numpy): forward, softmax cross-entropy, backward,
  `torch.optim.SGD(lr, momentum, nesterov=True)`; None without torch."""
  _check(dtype)
  if not available():
    return None
  import torch

  nets = [efficientnet(crops.shape[1], classes).train() for _ in range(members)]
  opts = [torch.optim.SGD(n.parameters(), lr=lr, momentum=momentum, nesterov=True) for n in nets]
  x = torch.from_numpy(crops).contiguous(memory_format=torch.channels_last)
  y = torch.from_numpy(labels).long()

  def run():
    for net, opt in zip(nets, opts):
      opt.zero_grad(set_to_none=True)
      with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
        loss = torch.nn.functional.cross_entropy(net(x), y)
      loss.backward()
      opt.step()

  run()
  return run, dict(_info("efficientnet_b0", dtype), members=members,
                   optimizer=f"SGD(lr={lr}, momentum={momentum}, nesterov=True)")


def efficientnet_features_case(images, classes: int, dtype: str = "float32", members: int = 1):
  """(run, info): `run()` computes each of `members` networks' block6a activation of
  images [N, C, H, W] float32 (numpy), mean-pooled over space, [N, 672]; None without torch."""
  _check(dtype)
  if not available():
    return None
  import torch

  trunks = []
  for _ in range(members):
    net = efficientnet(images.shape[1], classes).eval()
    block6a = net.features[6][0].block  # expansion, depthwise (+ BatchNorm, SiLU), SE, projection
    trunks.append(torch.nn.Sequential(*net.features[:6], block6a[0], block6a[1]))
  x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)

  def run():
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16,
                                                enabled=dtype == "bfloat16"):
      for trunk in trunks:
        trunk(x).float().mean(dim=(2, 3))

  run()
  return run, dict(_info("efficientnet_b0", dtype), members=members, layer="block6a_activation")
