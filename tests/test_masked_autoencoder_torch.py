"""The PyTorch U-Net that benchmarks/bench_unet.py times is cellrep's masked U-Net: the same
parameter count and, with one's weights copied into the other, the same reconstruction,
embedding (float32 against float32), masked loss and gradients (cellrep's float32 against
PyTorch's float64), within the tolerances stated beside each check.

The reference (`benchmarks/torch_ref.py`: Cellpose's CPnet modules, under their state_dict
names) needs torch (the `bench` extra); without it these tests are skipped.
"""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cellrep import models
from cellrep.train.objectives import MaskedReconstruction
from tests.conftest import REPO

torch = pytest.importorskip("torch")
sys.path.insert(0, str(REPO / "benchmarks"))
import torch_ref  # noqa: E402

SMALL, DEFAULT = (8, 16), (32, 64, 128, 256)
# float32 on both sides, XLA's convolutions against oneDNN's: different summation orders
# through ~20 layers (measured: within 3e-7). Outputs of order 1; embeddings have unit norm.
ATOL, RTOL = 1e-5, 1e-5


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _flax(widths, style=True):
  return models.build({"name": "masked_unet", "widths": widths, "style": style,
                       "conv_impl": "xla"})


def torch_key(path: tuple[str, ...]) -> str:
  """The CPnet state_dict key of one Flax variable (path: collection dropped, leaf kept):
  encoder_l -> downsample.down.res_down_l, decoder_l -> upsample.up.res_up_l (its conv_1..3
  are Cellpose's batchconvstyle, whose ``full`` Linear is our style_i), head -> output; in a
  batchconv the BatchNorm is module 0 and the convolution 2 (1 in the projection: no ReLU)."""
  *modules, leaf = path
  name = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
          "var": "running_var"}[leaf]
  if modules[0] == "head":
    return f"output.{ {'bn': 0, 'conv': 2}[modules[1]] }.{name}"
  kind, level = re.fullmatch(r"(encoder|decoder)_(\d+)", modules[0]).groups()
  prefix = (f"downsample.down.res_down_{level}" if kind == "encoder"
            else f"upsample.up.res_up_{level}")
  block = modules[1]
  if block.startswith("style_"):
    return f"{prefix}.conv.conv_{block[len('style_'):]}.full.{name}"
  if block == "proj":
    return f"{prefix}.proj.{ {'bn': 0, 'conv': 1}[modules[2]] }.{name}"
  styled = ".conv" if kind == "decoder" and block != "conv_0" else ""
  return f"{prefix}.conv.{block}{styled}.{ {'bn': 0, 'conv': 2}[modules[2]] }.{name}"


def to_flax(state: dict, template) -> tuple[dict, set]:
  """Flax variables shaped like `template` from a CPnet state_dict, and the keys used."""
  used = set()

  def convert(path, like):
    names = tuple(p.key for p in path)[1:]
    key = torch_key(names)
    used.add(key)
    w = state[key].detach().numpy()
    if names[-1] == "kernel":
      w = w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T  # OIHW -> HWIO; [out, in] -> [in, out]
    assert w.shape == like.shape, (key, w.shape, like.shape)
    return jnp.asarray(w, jnp.float32)

  return jax.tree_util.tree_map_with_path(convert, template), used


def _randomise(net, seed=0):
  """Non-trivial BatchNorm affines and running statistics (and biases): what inference
  mode reads must be copied right, not merely be the identity on both sides."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
  return net


def _pair(widths, channels=1, size=32, style=True):
  torch.manual_seed(0)
  net = _randomise(torch_ref.unet(channels, widths, style=style))
  model = _flax(widths, style)
  template = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, size, size, channels)))
  variables, used = to_flax(net.state_dict(), template)
  expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
  assert used == expected  # one to one: every tensor of each side has its counterpart
  return net, model, variables


def test_parameter_counts_match_the_flax_model():
  for style, count in ((True, 6_600_453), (False, 6_230_373)):
    net = torch_ref.unet(1, DEFAULT, style=style)
    model = _flax(DEFAULT, style)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 1)))
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert trainable == _count(shapes["params"]) == count
    buffers = sum(b.numel() for n, b in net.named_buffers() if "num_batches" not in n)
    assert buffers == _count(shapes["batch_stats"])


def _images(channels=1, size=32, seed=1):
  return np.random.default_rng(seed).normal(size=(2, channels, size, size)).astype(np.float32)


def _torch_forward(net, x, mask=None):
  with torch.no_grad():
    recon, emb = net.eval()(torch.from_numpy(x).contiguous(memory_format=torch.channels_last),
                            None if mask is None else torch.from_numpy(np.array(mask)))
  return recon.numpy().transpose(0, 2, 3, 1), emb.numpy()


@pytest.mark.parametrize("widths,channels,style", [
    (SMALL, 1, True), (SMALL, 3, True), (SMALL, 1, False), (DEFAULT, 1, True)])
def test_inference_matches_pytorch_with_the_same_weights(widths, channels, style):
  net, model, variables = _pair(widths, channels, style=style)
  x = _images(channels)
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  apply = jax.jit(model.apply, static_argnames=("capture", "mask_ratio"))
  out, feats = apply(variables, nhwc, capture=("embedding",))
  recon, emb = _torch_forward(net, x)
  assert np.abs(recon).max() > 0.1  # a network, not a constant
  np.testing.assert_allclose(out["reconstruction"], recon, atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(feats["embedding"], emb, atol=ATOL, rtol=RTOL)
  # Masked: the mask Flax drew, handed to PyTorch, zero-fills the same pixels.
  out, feats = apply(variables, nhwc, capture=("embedding",), mask_ratio=0.25,
                     rngs={"mask": jax.random.key(3)})
  mask = np.asarray(out["mask"])
  assert mask.mean() == 0.25
  recon, emb = _torch_forward(net, x, mask)
  np.testing.assert_allclose(out["reconstruction"], recon, atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(feats["embedding"], emb, atol=ATOL, rtol=RTOL)


def _torch_loss(net, x, mask=None):
  """PyTorch's train-mode forward and MSE in the module's dtype, on the hidden pixels given
  a mask (zero-filled in the input), else on all."""
  net.train().zero_grad()
  dtype = next(net.parameters()).dtype
  tx = torch.from_numpy(x).to(dtype).contiguous(memory_format=torch.channels_last)
  if mask is None:
    return (net(tx)[0] - tx).square().mean()
  hidden = torch.from_numpy(np.array(mask)).to(dtype)
  recon, _ = net(tx, hidden)
  return ((recon - tx).square() * hidden[:, None]).sum() / hidden.sum()


@pytest.mark.parametrize("ratio", [0.25, 0.0])
def test_train_mode_loss_and_gradients_match_pytorch(ratio):
  # What the train steps differentiate: train-mode BatchNorm (batch statistics) and the MSE,
  # on the hidden pixels (the pretraining loss) or on all. The reference is the PyTorch
  # module in float64: PyTorch's own float32 gradients of the masked loss are 5-9e-4 (of the
  # largest entry) off it, Flax's float32 ones within 1e-4, so float32 against float32 would
  # measure PyTorch's rounding rather than the network.
  net, model, variables = _pair(SMALL, 1, size=64)
  x = _images(1, 64)
  nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))

  def loss(params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, nhwc,
                         train=True, mask_ratio=ratio, rngs={"mask": jax.random.key(5)},
                         mutable=["batch_stats"])
    return MaskedReconstruction(masked_only=ratio > 0).loss(out, {"images": nhwc})[0], out["mask"]

  (value, mask), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  net = net.double()
  tloss = _torch_loss(net, x, mask if ratio else None)
  tloss.backward()
  np.testing.assert_allclose(float(value), tloss.item(), rtol=1e-5)
  tgrads = {k: p.grad.numpy() for k, p in net.named_parameters()}
  largest = max(np.abs(g).max() for g in tgrads.values())

  def check(path, g):
    names = tuple(p.key for p in path)
    t = tgrads[torch_key(names)]
    t = t.transpose(2, 3, 1, 0) if t.ndim == 4 else (t.T if t.ndim == 2 else t)
    # Every entry within 1e-4 of the largest gradient entry of any parameter (the biases
    # that train-mode BatchNorm cancels have an exact gradient of zero: no scale of their own).
    np.testing.assert_allclose(g, t, atol=1e-4 * largest, rtol=0, err_msg=str(names))

  jax.tree_util.tree_map_with_path(check, grads)
