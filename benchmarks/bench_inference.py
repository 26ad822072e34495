r"""Ensemble inference: the 10-member ResNet-50 predictor against PyTorch's ResNet-50, same run.

  .venv/bin/python benchmarks/bench_inference.py [--quick] [--profile DIR] [--batch 128,256]
      [--out FILE]

Each batch size is its own run (own rounds and references), one after the other; the
first writes --out (results/inference.json), each further one the file beside it named
after its batch (results/inference_256.json: 256 is the classify task's
`predict.batch_size`). The default measures 128 and 256; --quick one tiny batch.

cellrep: `cellrep.infer.predict.make_predict_fn` on [batch, 14, 60, 60] crops
(centre crop, ResNet-50 with an ImageNet stem taking 14 channels, softmax per
member), jitted; variants (`VARIANTS`) by member strategy, convolution
implementation and compute dtype (``auto`` is the default predictor: bfloat16 products
on CPUs with AVX512-BF16/AMX, float32 on others). PyTorch: torchvision's `resnet50` with
`conv1` swapped for 14 input channels, `eval()`, `channels_last`,
`torch.inference_mode()`, float32, all cores (`torch.set_num_threads`); and the same
under `torch.autocast("cpu", torch.bfloat16)` (``torch_bf16``); both on the same crops
(`torch_ref.predict_case`).

The ensemble predicts M members per cell, so the comparison is per member-image:
cellrep member-images/s = M * cells/s against PyTorch images/s of one network.
All cases run in turn round after round, with jitted 2048^2 matrix products as the
machine's reference (`bench_peak.py`: float32, and bfloat16 operands accumulating in
float32). GFLOP/s of every variant, PyTorch's included, and MFU (÷ the reference of
the variant's dtype) use the same model FLOPs: XLA's
cost analysis of one member's forward pass with XLA convolutions, times M (the
cost analysis of a ``lax.map`` program counts its loop body once, and im2col
products also count the padding's zeros); the multiplications Winograd saves are
not subtracted, so its MFU is an effective rate. Needs the `bench` extra (torch,
torchvision); without it, cellrep alone is measured.
"""

from __future__ import annotations

import benchlib
import torch_ref

# name: (strategy, conv_impl, compute dtype, members per map iteration); "auto" as the
# predictor's defaults (make_predict_fn).
VARIANTS = {
    "auto": ("auto", "auto", "auto", 1),          # CPU: map over members one at a time; bfloat16
                                                  # products + im2col where the CPU has them
    "auto_f32": ("auto", "auto", "float32", 1),   # float32: Winograd 3x3 convolutions
    "im2col_f32": ("auto", "im2col", "float32", 1),
    "winograd_bf16": ("auto", "winograd", "bfloat16", 1),  # faster, less accurate (conv.py)
    "vmap": ("vmap", "auto", "auto", 1),          # all members at once
    "map2": ("map", "auto", "auto", 2),           # chunks of 2 members
    "loop": ("loop", "xla", "float32", 1),        # the predictor before issue 4
}
CHANNELS = 14
CLASSES = 8
REFERENCE_N = 2048
REFERENCE_DTYPES = ("float32", "bfloat16")
# PyTorch baselines: "torch" is the (float32); "torch_bf16" under autocast.
TORCH_CASES = torch_ref.CASES


def host_crops(batch: int, size: int):
  """[batch, 14, size, size] float32 Poisson counts, the crops both sides predict."""
  import numpy as np
  return np.random.default_rng(0).poisson(3.0, (batch, CHANNELS, size, size)).astype(np.float32)


def jax_cases(members: int, batch: int, size: int, variants, name="resnet50", **model_kw):
  """{variant: (run, info)}: each run predicts one batch of crops to completion."""
  import jax
  import jax.numpy as jnp
  from cellrep.data import augment
  from cellrep.data.pipeline import data_sharding
  from cellrep import models
  from cellrep.infer.predict import as_policy, make_predict_fn
  from cellrep.train.ensemble import make_mesh

  def get_model(name, classes, **kwargs):
    return models.build({"name": name, "num_classes": classes, **kwargs})

  mesh = make_mesh(1, 1)
  crops = jax.device_put(host_crops(batch, size), data_sharding(mesh))
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
    model = get_model(name, CLASSES, conv_impl=conv_impl, **model_kw)
    policy = as_policy(strategy, model, map_batch, dtype)  # what the predictor resolves to
    fn = make_predict_fn(model, preprocess, mesh, policy)
    info = {"strategy": policy.predict_strategy, "dtype": policy.predict_dtype,
            "map_batch": policy.predict_map_batch if policy.predict_strategy == "map" else 0,
            "conv_impl": policy.predict_conv_impl}
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


def torch_case(batch: int, size: int, name="resnet50", dtype: str = "float32"):
  """(run, info) for torchvision's network on [batch, 14, size, size], or None without torch.

  dtype ``bfloat16``: under `torch.autocast` (oneDNN's bf16 convolutions on CPUs that
  have them), the counterpart of cellrep's bfloat16 predictor."""
  return torch_ref.predict_case(host_crops(batch, size), name, CLASSES, dtype)


def measure(args, name, members, batch, size, kw, variants, rounds, tag="") -> dict:
  """One run at one batch size: every variant and PyTorch case in turn, round after round."""
  result = benchlib.header("inference", args)
  result.update({"model": name, "model_kwargs": kw, "members": members, "batch": batch,
                 "input": [CHANNELS, size, size], "rounds": rounds})
  from bench_peak import reference_cases, reference_gflops

  print(f"{members} x {name}, batch {batch}, {size}x{size}:", flush=True)
  jcases, member_flops = jax_cases(members, batch, size, variants, name, **kw)
  tcases = {key: torch_case(batch, size, name, dtype) for key, dtype in TORCH_CASES.items()}
  tcases = {key: c for key, c in tcases.items() if c}
  cases = {v: run for v, (run, _, _) in jcases.items()}
  cases.update({key: run for key, (run, _) in tcases.items()})
  ref_cases, ref_flops = reference_cases(REFERENCE_DTYPES, REFERENCE_N)
  cases.update(ref_cases)
  timing = benchlib.interleave(cases, rounds)
  refs, ref_times = reference_gflops(timing, ref_flops)
  result.update({"member_model_flops": member_flops, "model_flops": member_flops * members,
                 "reference_gflops": refs, "reference_f32_gflops": refs["float32"],
                 "reference_times": ref_times})
  result["variants"] = {}
  for v, (_, info, _) in jcases.items():
    t = timing[v]
    r = dict(info, **t)
    r["cells_per_s"] = batch / t["median_wall_s"]
    r["member_images_per_s"] = members * batch / t["median_wall_s"]
    r["gflops"] = member_flops * members / t["median_wall_s"] / 1e9
    r["mfu"] = r["gflops"] / refs[r["dtype"]]
    result["variants"][v] = r
    print(f"{v:10s} {r['cells_per_s']:8.1f} cells/s  {r['member_images_per_s']:8.1f} member-images/s"
          f"  {r['gflops']:6.1f} GFLOP/s  MFU {100 * r['mfu']:4.1f}%", flush=True)
  for key, (_, info) in tcases.items():
    t = timing[key]
    result[key] = dict(info, **t, images_per_s=batch / t["median_wall_s"],
                       gflops=member_flops / t["median_wall_s"] / 1e9)
    result[key]["mfu"] = result[key]["gflops"] / refs[info["dtype"]]
    result[f"vs_{key}"] = {v: r["member_images_per_s"] / result[key]["images_per_s"]
                           for v, r in result["variants"].items()}
    print(f"{key:10s} {result[key]['images_per_s']:8.1f} images/s; per member-image vs {key}: "
          + ", ".join(f"{v} {x:.2f}x" for v, x in result[f"vs_{key}"].items()), flush=True)
  print("reference matmul " + ", ".join(f"{d} {g:.1f}" for d, g in refs.items()) + " GFLOP/s",
        flush=True)
  result["load_average_end"] = benchlib.load()
  for v, (run, _, compiled) in jcases.items():
    benchlib.profile(args.profile, f"predict_{v}{tag}", run, compiled)
  return result


def main():
  p = benchlib.parser(__doc__, "inference")
  p.add_argument("--batch", default=None,
                 help="comma-separated batch sizes, one run and one JSON file each "
                      "(default 128,256; with --quick 4)")
  p.add_argument("--members", type=int, default=10)
  p.add_argument("--variants", default=",".join(VARIANTS))
  args = p.parse_args()
  benchlib.setup_jax()
  variants = args.variants.split(",")
  batches = [int(b) for b in (args.batch or ("4" if args.quick else "128,256")).split(",")]
  if args.quick:
    name, members, size, kw = "resnet18", 2, 32, {"width": 0.0625}
  else:
    name, members, size, kw = "resnet50", args.members, 60, {}
  rounds = args.repeats or (1 if args.quick else 7)
  for i, batch in enumerate(batches):
    tag = f"_{batch}" if i else ""  # the first batch writes --out, the others beside it
    result = measure(args, name, members, batch, size, kw, variants, rounds, tag)
    benchlib.write(benchlib.companion(args.out, tag), result)


if __name__ == "__main__":
  main()
