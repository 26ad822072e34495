r"""Ensemble inference: the 10-member ResNet-50 predictor against PyTorch's ResNet-50, same run.

  .venv/bin/python benchmarks/bench_inference.py [--quick] [--profile DIR] [--batch 128]
      [--out FILE]

`make bench` runs it at batch 128 (results/inference.json) and at 256, the
classify task's `predict.batch_size` (results/inference_256.json).

cellrep: `cellrep.infer.predict.make_predict_fn` on [batch, 14, 60, 60] crops
(centre crop, ResNet-50 with an ImageNet stem taking 14 channels, softmax per
member), jitted; variants (`VARIANTS`) by member strategy, convolution
implementation and compute dtype (``auto`` is the default predictor). PyTorch: torchvision's `resnet50` with
`conv1` swapped for 14 input channels, `eval()`, `channels_last`,
`torch.inference_mode()`, float32, all cores (`torch.set_num_threads`).

The ensemble predicts M members per cell, so the comparison is per member-image:
cellrep member-images/s = M * cells/s against PyTorch images/s of one network.
All cases run in turn round after round, with a jitted float32 2048^2 matrix
product as the machine's reference (`bench_peak.py`). GFLOP/s and MFU (÷ that
reference) of every variant, PyTorch's included, use the same model FLOPs: XLA's
cost analysis of one member's forward pass with XLA convolutions, times M (the
cost analysis of a ``lax.map`` program counts its loop body once, and im2col
products also count the padding's zeros); the multiplications Winograd saves are
not subtracted, so its MFU is an effective rate. Needs the `bench` extra (torch,
torchvision); without it, cellrep alone is measured.
"""

from __future__ import annotations

import os

import benchlib

# name: (strategy, conv_impl, compute dtype, members per map iteration)
VARIANTS = {
    "auto": ("auto", "auto", "float32", 1),       # CPU: map over members one at a time, Winograd
    "auto_im2col": ("auto", "im2col", "float32", 1),  # the same with im2col 3x3 convolutions
    "auto_bf16": ("auto", "auto", "bfloat16", 1),
    "vmap": ("vmap", "auto", "float32", 1),       # all members at once
    "map2": ("map", "auto", "float32", 2),        # chunks of 2 members
    "loop": ("loop", "xla", "float32", 1),        # the predictor before issue 4
}
CHANNELS = 14
CLASSES = 8
REFERENCE_N = 2048


def jax_cases(members: int, batch: int, size: int, variants, name="resnet50", **model_kw):
  """{variant: (run, info)}: each run predicts one batch of crops to completion."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from cellrep.data import augment
  from cellrep.data.pipeline import data_sharding
  from cellrep.infer.predict import CPU_PREDICT_MAP_BATCH, make_predict_fn
  from cellrep.models import get_model
  from cellrep.models.conv import resolve_conv_impl
  from cellrep.train.ensemble import make_mesh

  mesh = make_mesh(1, 1)
  rng = np.random.default_rng(0)
  crops = jax.device_put(rng.poisson(3.0, (batch, CHANNELS, size, size)).astype(np.float32),
                         data_sharding(mesh))
  base = get_model(name, CLASSES, **model_kw)
  keys = jax.random.split(jax.random.key(0), members)
  variables = jax.jit(jax.vmap(lambda k: base.init(k, jnp.zeros((1, size, size, CHANNELS)))))(keys)

  def preprocess(c):
    return augment.center(c, size)

  xla_model = get_model(name, CLASSES, conv_impl="xla", **model_kw)
  first = jax.tree.map(lambda x: x[0], variables)
  member_flops = benchlib.cost_flops(jax.jit(
      lambda v, c: xla_model.apply(v, preprocess(c), train=False)).lower(first, crops).compile())
  cases = {}
  for variant in variants:
    strategy, conv_impl, dtype, map_batch = VARIANTS[variant]
    model = get_model(name, CLASSES, conv_impl=conv_impl, dtype=dtype, **model_kw)
    fn = make_predict_fn(model, preprocess, mesh, strategy, map_batch=map_batch)
    info = {"strategy": strategy, "conv_impl": resolve_conv_impl(conv_impl, inference=True),
            "dtype": dtype, "map_batch": map_batch}
    if strategy == "auto":
      cpu = jax.default_backend() == "cpu"
      info["strategy"], info["map_batch"] = ("map", CPU_PREDICT_MAP_BATCH) if cpu else ("vmap", 0)
    if hasattr(fn, "lower"):
      compiled = fn.lower(variables, crops).compile()
      info["program_flops"] = benchlib.cost_flops(compiled)
      memory = compiled.memory_analysis()
      info["temp_gib"] = memory.temp_size_in_bytes / 2**30 if memory else None
    else:
      compiled = None
    fn(variables, crops).block_until_ready()

    def run(fn=fn):
      jax.block_until_ready(fn(variables, crops))

    cases[variant] = (run, info, compiled)
  return cases, member_flops


def torch_case(batch: int, size: int, name="resnet50"):
  """(run, info) for torchvision's network on [batch, 14, size, size], or None without torch."""
  try:
    import torch
    import torchvision
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count())
  net = getattr(torchvision.models, name)(num_classes=CLASSES)
  net.conv1 = torch.nn.Conv2d(CHANNELS, 64, kernel_size=7, stride=2, padding=3, bias=False)
  net = net.eval().to(memory_format=torch.channels_last)
  x = torch.randn(batch, CHANNELS, size, size).to(memory_format=torch.channels_last)

  def run():
    with torch.inference_mode():
      net(x)

  run()
  return run, {"torch_threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
               "memory_format": "channels_last", "dtype": "float32"}


def main():
  p = benchlib.parser(__doc__, "inference")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--members", type=int, default=10)
  p.add_argument("--variants", default=",".join(VARIANTS))
  args = p.parse_args()
  benchlib.setup_jax()
  variants = args.variants.split(",")
  if args.quick:
    name, members, batch, size, kw = "resnet18", 2, 4, 32, {"width": 0.0625}
  else:
    name, members, batch, size, kw = "resnet50", args.members, args.batch, 60, {}
  rounds = args.repeats or (1 if args.quick else 7)
  result = benchlib.header("inference", args)
  result.update({"model": name, "model_kwargs": kw, "members": members, "batch": batch,
                 "input": [CHANNELS, size, size], "rounds": rounds})
  from bench_peak import matmul_case

  jcases, member_flops = jax_cases(members, batch, size, variants, name, **kw)
  tcase = torch_case(batch, size, name)
  cases = {v: run for v, (run, _, _) in jcases.items()}
  if tcase:
    cases["torch"] = tcase[0]
  cases["reference_matmul"], ref_flops, _ = matmul_case(REFERENCE_N, "float32")
  timing = benchlib.interleave(cases, rounds)
  ref = timing.pop("reference_matmul")
  ref_gflops = ref_flops / ref["median_wall_s"] / 1e9
  result.update({"member_model_flops": member_flops, "model_flops": member_flops * members,
                 "reference_f32_gflops": ref_gflops, "reference_times": ref})
  result["variants"] = {}
  for v, (_, info, _) in jcases.items():
    t = timing[v]
    r = dict(info, **t)
    r["cells_per_s"] = batch / t["median_wall_s"]
    r["member_images_per_s"] = members * batch / t["median_wall_s"]
    r["gflops"] = member_flops * members / t["median_wall_s"] / 1e9
    r["mfu"] = r["gflops"] / ref_gflops
    result["variants"][v] = r
    print(f"{v:10s} {r['cells_per_s']:8.1f} cells/s  {r['member_images_per_s']:8.1f} member-images/s"
          f"  {r['gflops']:6.1f} GFLOP/s  MFU {100 * r['mfu']:4.1f}%", flush=True)
  if tcase:
    t = timing["torch"]
    result["torch"] = dict(tcase[1], **t, images_per_s=batch / t["median_wall_s"],
                           gflops=member_flops / t["median_wall_s"] / 1e9)
    result["torch"]["mfu"] = result["torch"]["gflops"] / ref_gflops
    result["vs_torch"] = {v: r["member_images_per_s"] / result["torch"]["images_per_s"]
                          for v, r in result["variants"].items()}
    print(f"{'torch':10s} {result['torch']['images_per_s']:8.1f} images/s; per member-image vs torch: "
          + ", ".join(f"{v} {x:.2f}x" for v, x in result["vs_torch"].items()), flush=True)
  print(f"reference matmul {ref_gflops:.1f} GFLOP/s", flush=True)
  result["load_average_end"] = benchlib.load()
  for v, (run, _, compiled) in jcases.items():
    benchlib.profile(args.profile, f"predict_{v}", run, compiled)
  benchlib.write(args.out, result)


if __name__ == "__main__":
  main()
