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

`unet(channels)` is Microsnoop's masked U-Net (Cellpose's CPnet: resdown / resup /
batchconvstyle, nearest upsampling, additive skips, style Denses, a 1x1 head back to
`channels`), the network of `cellrep.models.masked_autoencoder` under Cellpose's module
names (tests/test_masked_autoencoder_torch.py copies its weights into cellrep's and compares),
channels_last, all cores (bench_unet.py):

- `unet_train_case`: a fresh patch mask per example (`patch_mask`), forward, MSE on the
  hidden pixels, backward, Adam step per network;
- `unet_embed_case`: `eval()`, `torch.inference_mode()`, the encoder to the embedding (the
  L2-normalised mean of its deepest map).

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


# Microsnoop's masked residual U-Net (Cellpose's CPnet), as `cellrep.models.masked_autoencoder`.
UNET_WIDTHS = (32, 64, 128, 256)


def unet(channels: int = 1, widths=UNET_WIDTHS, style: bool = True, mask_patch: int = 16,
         mask_ratio: float = 0.25):
  """Cellpose's residual U-Net (`resnet_torch.CPnet`: ``resdown`` / ``resup`` /
  ``batchconvstyle``, residual_on, concatenation off) on [N, channels, H, W], with
  Microsnoop's patch masking and a head back to `channels`, channels_last, all cores.

  Module names are Cellpose's (``downsample.down.res_down_<l>.conv.conv_<i>.<j>``, ...), so
  its state_dict keys are a CPnet's. `forward(x, mask=None) -> (reconstruction [N, C, H, W],
  embedding [N, widths[-1]])`: mask [N, H, W] (1 = hidden) zero-fills those pixels first.
  """
  import torch

  torch.set_num_threads(os.cpu_count())
  return _unet_classes().CPnet(channels, widths, style, mask_patch, mask_ratio).to(
      memory_format=torch.channels_last)


def _unet_classes():
  """Cellpose's modules, defined on first use (torch is an optional import)."""
  global _UNET
  if _UNET is not None:
    return _UNET
  import types

  import torch.nn.functional as F
  from torch import nn

  def batchconv(cin, cout, k):  # Cellpose's batchconv: BatchNorm, ReLU, k x k convolution
    return nn.Sequential(nn.BatchNorm2d(cin, eps=1e-5, momentum=0.05), nn.ReLU(inplace=True),
                         nn.Conv2d(cin, cout, k, padding=k // 2))

  def batchconv0(cin, cout, k):  # Cellpose's batchconv0: no ReLU (the 1x1 projection)
    return nn.Sequential(nn.BatchNorm2d(cin, eps=1e-5, momentum=0.05),
                         nn.Conv2d(cin, cout, k, padding=k // 2))

  class resdown(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.conv = nn.Sequential()
      self.proj = batchconv0(cin, cout, 1)
      for t in range(4):
        self.conv.add_module(f"conv_{t}", batchconv(cin if t == 0 else cout, cout, 3))

    def forward(self, x):
      x = self.proj(x) + self.conv[1](self.conv[0](x))
      return x + self.conv[3](self.conv[2](x))

  class batchconvstyle(nn.Module):
    def __init__(self, cin, cout, style_channels):
      super().__init__()
      self.conv = batchconv(cin, cout, 3)
      self.full = nn.Linear(style_channels, cout) if style_channels else None

    def forward(self, style, x, y=None):
      if y is not None:
        x = x + y  # the encoder's skip, added (concatenation=False)
      if self.full is not None:
        x = x + self.full(style)[:, :, None, None]
      return self.conv(x)

  class resup(nn.Module):
    def __init__(self, cin, cout, style_channels):
      super().__init__()
      self.conv = nn.Sequential()
      self.conv.add_module("conv_0", batchconv(cin, cout, 3))
      for t in (1, 2, 3):
        self.conv.add_module(f"conv_{t}", batchconvstyle(cout, cout, style_channels))
      self.proj = batchconv0(cin, cout, 1)

    def forward(self, x, y, style):
      x = self.proj(x) + self.conv[1](style, self.conv[0](x), y=y)
      return x + self.conv[3](style, self.conv[2](style, x))

  class downsample(nn.Module):
    def __init__(self, nbase):
      super().__init__()
      self.down = nn.Sequential()
      for n in range(len(nbase) - 1):
        self.down.add_module(f"res_down_{n}", resdown(nbase[n], nbase[n + 1]))

    def forward(self, x):
      xd = []
      for n, block in enumerate(self.down):
        xd.append(block(F.max_pool2d(xd[-1], 2, 2) if n else x))
      return xd

  class upsample(nn.Module):
    def __init__(self, nbaseup, style_channels):
      super().__init__()
      self.up = nn.Sequential()
      for n in range(1, len(nbaseup)):
        self.up.add_module(f"res_up_{n - 1}", resup(nbaseup[n], nbaseup[n - 1], style_channels))

    def forward(self, style, xd):
      x = self.up[-1](xd[-1], xd[-1], style)  # the deepest level takes the bottleneck itself
      for n in range(len(self.up) - 2, -1, -1):
        x = self.up[n](F.interpolate(x, scale_factor=2, mode="nearest"), xd[n], style)
      return x

  class CPnet(nn.Module):
    def __init__(self, channels, widths, style, mask_patch, mask_ratio):
      super().__init__()
      nbase = [channels, *widths]
      nbaseup = [*widths, widths[-1]]
      self.mask_patch, self.mask_ratio = mask_patch, mask_ratio
      self.downsample = downsample(nbase)
      self.upsample = upsample(nbaseup, widths[-1] if style else 0)
      self.output = batchconv(nbaseup[0], channels, 1)

    def encode(self, x, mask=None):
      """The encoder's maps and the embedding (Cellpose's make_style: the spatial mean of the
      deepest map, L2-normalised)."""
      if mask is not None:
        x = x * (1 - mask[:, None].to(x.dtype))
      xd = self.downsample(x)
      pooled = xd[-1].float().mean(dim=(2, 3))
      return xd, pooled / pooled.square().sum(dim=1, keepdim=True).clamp_min(1e-24).sqrt()

    def forward(self, x, mask=None):
      xd, style = self.encode(x, mask)
      return self.output(self.upsample(style.to(xd[-1].dtype), xd)), style

  _UNET = types.SimpleNamespace(CPnet=CPnet, batchconv=batchconv, resdown=resdown, resup=resup)
  return _UNET


_UNET = None


def patch_mask(batch: int, height: int, width: int, patch: int, ratio: float, generator=None):
  """[batch, height, width] float32, 1 on round(ratio x patches) randomly chosen patch x patch
  patches of each image, drawn per example (as `cellrep.models.masking.patch_mask`)."""
  import torch

  gh, gw = height // patch, width // patch
  scores = torch.rand(batch, gh * gw, generator=generator)
  ranks = scores.argsort(dim=1).argsort(dim=1)
  chosen = (ranks < round(ratio * gh * gw)).float().view(batch, gh, 1, gw, 1)
  return chosen.expand(batch, gh, patch, gw, patch).reshape(batch, height, width)


def unet_train_case(images, dtype: str = "float32", members: int = 1, lr: float = 1e-3,
                    widths=UNET_WIDTHS, mask_patch: int = 16, mask_ratio: float = 0.25):
  """(run, info): `run()` is one pretraining step of each of `members` U-Nets on images
  [N, C, H, W] float32 (numpy): a fresh patch mask per example, forward (train-mode
  BatchNorm), MSE on the hidden pixels, backward, `torch.optim.Adam(lr)`; None without torch."""
  _check(dtype)
  if not available():
    return None
  import torch

  n, c, h, w = images.shape
  nets = [unet(c, widths, mask_patch=mask_patch, mask_ratio=mask_ratio).train()
          for _ in range(members)]
  opts = [torch.optim.Adam(net.parameters(), lr=lr) for net in nets]
  x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)
  generator = torch.Generator().manual_seed(0)

  def run():
    for net, opt in zip(nets, opts):
      mask = patch_mask(n, h, w, mask_patch, mask_ratio, generator)
      opt.zero_grad(set_to_none=True)
      with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bfloat16"):
        recon, _ = net(x, mask)
      hidden = mask[:, None].expand(n, c, h, w)
      loss = ((recon.float() - x).square() * hidden).sum() / hidden.sum().clamp_min(1.0)
      loss.backward()
      opt.step()

  run()
  return run, dict(_info("masked_unet", dtype), members=members, optimizer=f"Adam(lr={lr})",
                   mask=f"{mask_ratio} of {mask_patch} px patches")


def unet_embed_case(images, dtype: str = "float32", members: int = 1, widths=UNET_WIDTHS):
  """(run, info): `run()` computes each of `members` U-Nets' embedding of images [N, C, H, W]
  float32 (numpy): `eval()`, `torch.inference_mode()`, the encoder to the L2-normalised mean
  of its deepest map, [N, widths[-1]]; None without torch."""
  _check(dtype)
  if not available():
    return None
  import torch

  nets = [unet(images.shape[1], widths).eval() for _ in range(members)]
  x = torch.from_numpy(images).contiguous(memory_format=torch.channels_last)

  def run():
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16,
                                                enabled=dtype == "bfloat16"):
      for net in nets:
        net.encode(x)[1]

  run()
  return run, dict(_info("masked_unet", dtype), members=members, layer="embedding")
