r"""EfficientNet-B0 (the Cell Painting CNN) at 128x128x5, batch 32, against torchvision's, one run.

  .venv/bin/python benchmarks/bench_efficientnet.py [--quick] [--profile DIR] [--out FILE]
      [--parts depthwise,one,one_xla,ensemble] [--variants im2col_f32,...] [--members 10]
      [--batch 32] [--size 128]

Two tasks, each for one network and for an ensemble of `--members` (10):

  train     the real ensemble train step (`cellrep.train.ensemble.make_train_step`, strategy
            ``auto``: on this CPU the members' saved activations decide vmap or lax.map over
            member chunks): forward with train-mode BatchNorm, dropout 0.2 and stochastic
            depth 0.2 (as torchvision's defaults), softmax cross-entropy on CLASSES classes,
            backward, SGD with Nesterov momentum (0.9, lr 0.01)
  features  `cellrep.infer.embed.make_embed_fn` (on a CPU lax.map over members one at a
            time): the network to ``block6a_activation`` ([4, 4, 672]), inference-mode
            BatchNorm, mean-pooled over space, [M, batch, 672]

cellrep variants (`VARIANTS`): convolutions ``xla`` (lax.conv_general_dilated; depthwise
ones with feature_group_count), ``im2col`` (cellrep.ops.conv: 1x1 convolutions as matrix
products, depthwise ones as sums of the window's shifted views times the taps) or ``auto``
(the backend policy's choice, `resolve_conv_impl`), each in float32 and bfloat16 (bf16
products accumulating in float32, float32 parameters). An ``auto`` variant whose lowered
program is the program of the implementation it resolves to is not compiled or timed
again: its row repeats that implementation's timing and says so (``same_program_as``).

PyTorch (`torch_ref`, the `bench` extra): torchvision's `efficientnet_b0(num_classes=CLASSES)`
with its stem taking 5 channels, channels_last, all cores; float32 (``torch``) and under
bf16 autocast (``torch_bf16``); an ensemble of M is M networks run one after the other
in a Python loop. Both sides get the same host batch ([batch, 5, 128, 128] float32 in
[0, 1), random labels); cellrep's as [batch, 128, 128, 5] (NHWC, its layout), PyTorch's
converted to channels_last once, outside the timed step. ``vs_torch`` per variant is
PyTorch float32's time / the variant's (> 1: cellrep faster).

Parts (`PARTS`), each its own interleaved rounds, all written to one JSON file
(results/efficientnet.json):

  depthwise  the calibration micro-benchmark: one depthwise 3x3 convolution, C = 144, 32x32,
             batch 32, forward and forward + backward (gradients of input and kernel):
             XLA's feature_group_count convolution, cellrep's im2col form, the same shifted
             views differentiated by autodiff (the form before its kernel gradient was
             written out), PyTorch float32 and bf16 autocast
  one        both tasks, one network: im2col and auto variants and PyTorch, with the
             jitted matmul references (bench_peak.py) in the same rounds
  one_xla    both tasks, one network, xla variants: slower than im2col (train: ~4x), so one timed
             round after the first call; their vs_torch divides by part ``one``'s PyTorch
  ensemble   both tasks, `--members` networks: im2col and auto variants and PyTorch (xla
             ones are not timed: their one-network step times M is a lower bound)

Model FLOPs (per network), by XLA's cost analysis with XLA convolutions: features, the
one-network features program; train, 3 x one network's train-mode forward pass and loss
(the backward pass's two products per forward one). XLA's count of the train program itself
(``program_flops``, informational, as im2col's, which also count the padding's zeros) prices
each depthwise kernel gradient as a dense convolution, C times its FLOPs: 240 GFLOP for a
step of ~27 at batch 32, 128x128. GFLOP/s of every row,
PyTorch's included, = M x model FLOPs / time; MFU = that / the jitted matmul's GFLOP/s in
the row's dtype measured in part ``one``'s rounds (report.py divides by the larger of that
and bench_peak's).

The default run takes ~15-20 min on 2 idle cores (part ensemble about half; ``part_s`` in
the JSON), --quick ~14 min (compiles of the same programs at tiny shapes). PyTorch's OpenMP
threads wait for each other at every operation: with other work on the CPU its steps slow
several times over (batch 32, 2 threads with one core taken: 10x, 6-11 s a train step where
an idle or 1-thread run takes ~1 s), XLA's far less; time vs_torch on an otherwise idle machine.
"""

from __future__ import annotations

import time

import benchlib
import convnet_cases
import torch_ref
from convnet_cases import build_cases, model_flops

# name: (conv_impl, dtype)
VARIANTS = {
    "im2col_f32": ("im2col", "float32"),
    "auto_f32": ("auto", "float32"),
    "im2col_bf16": ("im2col", "bfloat16"),
    "auto_bf16": ("auto", "bfloat16"),
    "xla_f32": ("xla", "float32"),
    "xla_bf16": ("xla", "bfloat16"),
}
PARTS = ("depthwise", "one", "one_xla", "ensemble")
TASKS = ("train", "features")
CHANNELS = 5
CLASSES = 490
LAYER = "block6a_activation"
REFERENCE_N = 2048
LR, MOMENTUM = 0.01, 0.9
# The depthwise calibration: (batch, size, channels, kernel).
DEPTHWISE = (32, 32, 144, 3)


def host_batch(batch: int, size: int, seed: int = 0) -> dict:
  """[batch, 5, size, size] float32 images in [0, 1) (Cell Painting crops, 8-bit stretched),
  random labels."""
  import numpy as np
  rng = np.random.default_rng(seed)
  return {"crop": rng.random((batch, CHANNELS, size, size), dtype=np.float32),
          "label": rng.integers(0, CLASSES, batch).astype(np.int32)}


def get_model(conv_impl: str, dtype: str):
  from cellrep import models
  return models.build({"name": "efficientnet_b0", "dropout": 0.2, "drop_connect": 0.2},
                      num_classes=CLASSES, conv_impl=conv_impl, dtype=dtype)


class Builder(convnet_cases.Builder):
  """EfficientNet-B0's cases of one member count: `case("train", variant)` and
  `case("features", variant)` (`convnet_cases.Builder`)."""

  variants, infer_task, layer, channels = VARIANTS, "features", LAYER, CHANNELS

  def model(self, conv_impl: str, dtype: str):
    return get_model(conv_impl, dtype)

  def optimizer(self):
    import optax
    return optax.sgd(LR, momentum=MOMENTUM, nesterov=True)

  def host_data(self, batch: int, size: int) -> dict:
    import numpy as np
    host = host_batch(batch, size)
    return {"crop": np.ascontiguousarray(host["crop"].transpose(0, 2, 3, 1)),
            "label": host["label"]}


def torch_cases(task: str, members: int, batch: int, size: int) -> dict:
  """{"torch": (run, info), "torch_bf16": ...} of `task`, {} without torch."""
  host = host_batch(batch, size)
  out = {}
  for key, dtype in torch_ref.CASES.items():
    if task == "train":
      case = torch_ref.efficientnet_train_case(host["crop"], host["label"], CLASSES, dtype,
                                               members, LR, MOMENTUM)
    else:
      case = torch_ref.efficientnet_features_case(host["crop"], CLASSES, dtype, members)
    if case:
      out[key] = case
  return out


def rows(task, members, cases, tcases, timing, flops) -> dict:
  """The JSON of one (task, members): every variant's and PyTorch's timing and rate."""
  out = {"task": task, "members": members, "model_flops": flops, "variants": {}}
  for key, (_, info) in tcases.items():
    t = timing[key]
    out[key] = dict(info, **t, ms=1e3 * t["median_wall_s"],
                    gflops=members * flops / t["median_wall_s"] / 1e9)
  for variant, (_, info, _) in cases.items():
    t = timing[variant]
    out["variants"][variant] = dict(info, **t, ms=1e3 * t["median_wall_s"],
                                    gflops=members * flops / t["median_wall_s"] / 1e9)
  return out


finish = convnet_cases.finish


def show(r: dict) -> None:
  for name, v in r["variants"].items():
    same = f" (= {v['same_program_as']})" if "same_program_as" in v else ""
    vs = f"  vs PyTorch {v['vs_torch']:.2f}x" if "vs_torch" in v else ""
    print(f"  {r['task']:8s} x{r['members']:<2d} {name:12s} {v['ms']:9.1f} ms  "
          f"{v['gflops']:6.1f} GFLOP/s  MFU {100 * v['mfu']:4.1f}%{vs}{same}", flush=True)
  for key in ("torch", "torch_bf16"):
    if key in r:
      print(f"  {r['task']:8s} x{r['members']:<2d} {key:12s} {r[key]['ms']:9.1f} ms  "
            f"{r[key]['gflops']:6.1f} GFLOP/s  MFU {100 * r[key]['mfu']:4.1f}%", flush=True)


def measure_part(args, part: str, members: int, variants, rounds: int, warmup: int,
                 with_torch: bool, with_references: bool) -> tuple[list, dict]:
  """The (task, members) results of one part, timed in one interleaved set of rounds, and
  the matmul references measured in them ({} without)."""
  from bench_peak import reference_cases, reference_gflops

  print(f"== {part}: {members} network(s), batch {args.batch}, {args.size}x{args.size}x"
        f"{CHANNELS}: {', '.join(variants)}", flush=True)
  builder = Builder(members, args.batch, args.size)
  built, flops, tbuilt, timed = {}, {}, {}, {}
  for task in TASKS:
    built[task] = build_cases(builder, task, variants)
    flops[task] = model_flops(builder, task)
    tbuilt[task] = torch_cases(task, members, args.batch, args.size) if with_torch else {}
    timed.update({f"{task}/{v}": run for v, (run, info, _) in built[task].items()
                  if "same_program_as" not in info})
    timed.update({f"{task}/{k}": run for k, (run, _) in tbuilt[task].items()})
  ref_flops = {}
  if with_references:
    ref_cases, ref_flops = reference_cases(("float32", "bfloat16"), REFERENCE_N)
    timed.update(ref_cases)
  timing = benchlib.interleave(timed, rounds, warmup=warmup)
  refs, ref_times = reference_gflops(timing, ref_flops)
  results = []
  for task in TASKS:
    t = {v: timing[f"{task}/{info.get('same_program_as', v)}"]
         for v, (_, info, _) in built[task].items()}
    t.update({k: timing[f"{task}/{k}"] for k in tbuilt[task]})
    r = rows(task, members, built[task], tbuilt[task], t, flops[task])
    r["part"], r["rounds"], r["warmup"] = part, rounds, warmup
    results.append(r)
    for v, (run, info, compiled) in built[task].items():
      if "same_program_as" not in info:
        benchlib.profile(args.profile, f"{part}_{task}_x{members}_{v}", run, compiled)
  finish(results, refs or _nan_refs())
  for r in results:
    show(r)
  print(f"  load {benchlib.load()}", flush=True)
  return results, ({"reference_gflops": refs, "reference_times": ref_times} if refs else {})


_nan_refs = convnet_cases.nan_refs


def depthwise(args, rounds: int) -> dict:
  """The depthwise calibration: forward and forward + backward, per implementation."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax import lax
  from cellrep.ops import conv

  b, size, c, k = (2, 8, 16, 3) if args.quick else DEPTHWISE
  x = jax.random.normal(jax.random.key(0), (b, size, size, c), jnp.float32)
  w = jax.random.normal(jax.random.key(1), (k, k, 1, c), jnp.float32) / k
  dy = jax.random.normal(jax.random.key(2), (b, size, size, c), jnp.float32)
  pads = lax.padtype_to_pads((size, size), (k, k), (1, 1), "SAME")

  def views_autodiff(x, w):  # the shifted views of the padded input, differentiated by autodiff
    views, _ = conv.strided_views(x, (k, k), (1, 1), pads)
    taps = w.reshape(k * k, c)
    return sum(v * taps[t] for t, v in enumerate(views))

  impls = {"xla": lambda x, w: conv.conv2d(x, w, (1, 1), "SAME", "xla", c),
           "im2col": lambda x, w: conv.conv2d(x, w, (1, 1), "SAME", "im2col", c),
           "views_autodiff": views_autodiff}
  cases, outputs = {}, {}
  for name, f in impls.items():
    fwd = jax.jit(f)
    fb = jax.jit(lambda x, w, dy, f=f: jax.vjp(f, x, w)[1](dy))
    outputs[name] = (fwd(x, w), fb(x, w, dy))
    cases[f"{name}/forward"] = lambda fwd=fwd: jax.block_until_ready(fwd(x, w))
    cases[f"{name}/forward_backward"] = lambda fb=fb: jax.block_until_ready(fb(x, w, dy))
  ref = outputs["xla"]
  errors = {name: max(float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)))
                      for a, r in zip(jax.tree.leaves(o), jax.tree.leaves(ref)))
            for name, o in outputs.items()}
  if torch_ref.available():
    import torch
    torch.set_num_threads(__import__("os").cpu_count())
    layer = torch.nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False).to(
        memory_format=torch.channels_last)
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    tdy = torch.from_numpy(np.asarray(dy).transpose(0, 3, 1, 2).copy()).contiguous(
        memory_format=torch.channels_last)
    for key, dtype in torch_ref.CASES.items():
      autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")

      def tf(autocast=autocast):
        with torch.inference_mode(), torch.autocast(**autocast):
          layer(tx)

      def tfb(autocast=autocast):
        layer.zero_grad(set_to_none=True)
        tx.grad = None
        with torch.autocast(**autocast):
          y = layer(tx)
        y.backward(tdy.to(y.dtype))

      cases[f"{key}/forward"], cases[f"{key}/forward_backward"] = tf, tfb
  timing = benchlib.interleave(cases, rounds)
  out = {"batch": b, "size": size, "channels": c, "kernel": k, "rounds": rounds,
         "max_relative_error_vs_xla": errors, "cases": {}}
  for key, t in timing.items():
    name, phase = key.split("/")
    out["cases"].setdefault(name, {})[phase] = dict(t, ms=1e3 * t["median_wall_s"])
  for name, r in out["cases"].items():
    print(f"  depthwise {name:15s} forward {r['forward']['ms']:7.2f} ms, forward + backward "
          f"{r['forward_backward']['ms']:7.2f} ms", flush=True)
  return out


_done = convnet_cases.done


def main():
  p = benchlib.parser(__doc__, "efficientnet")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {','.join(PARTS)}")
  p.add_argument("--variants", default="",
                 help=f"replace the parts' cellrep variants, of {','.join(VARIANTS)}")
  p.add_argument("--members", type=int, default=0, help="the ensemble's networks (default 10)")
  p.add_argument("--batch", type=int, default=0, help="per network (default 32)")
  p.add_argument("--size", type=int, default=0, help="image side in pixels (default 128)")
  args = p.parse_args()
  parts = args.parts.split(",")
  chosen = args.variants.split(",") if args.variants else None
  unknown = sorted(set(parts) - set(PARTS)) + sorted(set(chosen or ()) - set(VARIANTS))
  if unknown:
    p.error(f"unknown part or variant {', '.join(unknown)}")
  args.members = args.members or (2 if args.quick else 10)
  args.batch = args.batch or (2 if args.quick else 32)
  args.size = args.size or (32 if args.quick else 128)
  benchlib.setup_jax()
  with_torch = torch_ref.available()

  def pick(*names):
    return [v for v in (chosen or VARIANTS) if v in names]

  fast = pick("im2col_f32", "auto_f32", "im2col_bf16", "auto_bf16")
  slow = pick("xla_f32", "xla_bf16")
  result = benchlib.header("efficientnet", args)
  result.update({"model": "efficientnet_b0", "batch": args.batch,
                 "input": [args.size, args.size, CHANNELS], "classes": CLASSES, "layer": LAYER,
                 "optimizer": f"sgd(lr={LR}, momentum={MOMENTUM}, nesterov=True)",
                 "variants": {v: {"conv_impl": c, "dtype": d} for v, (c, d) in VARIANTS.items()},
                 "cases": []})
  timings = {  # part: (networks, variants, rounds, warm-up rounds, PyTorch and references)
      "one_xla": (1, slow, args.repeats or 1, 0, False),
      "one": (1, fast, args.repeats or (1 if args.quick else 3), 1, True),
      "ensemble": (args.members, fast, args.repeats or (1 if args.quick else 2), 1, True),
  }
  result["part_s"] = {}  # each part's wall seconds: building, compiling and timing
  start = time.perf_counter()
  if "depthwise" in parts:
    print("== depthwise calibration", flush=True)
    result["depthwise"] = depthwise(args, args.repeats or (1 if args.quick else 7))
    _done(result, "depthwise", start)
    benchlib.write(args.out, result)
  # one_xla first: its xla_f32 programs give the model FLOPs every part uses.
  for part in ("one_xla", "one", "ensemble"):
    members, variants, rounds, warmup, full = timings[part]
    if part not in parts or not variants:
      continue
    t = time.perf_counter()
    cases, refs = measure_part(args, part, members, variants, rounds, warmup,
                               full and with_torch, full and "reference_gflops" not in result)
    result.update(refs)
    result["cases"] += cases
    finish(result["cases"], result.get("reference_gflops", _nan_refs()))
    _done(result, part, t)
    benchlib.write(args.out, result)
  result["total_s"] = time.perf_counter() - start
  result["load_average_end"] = benchlib.load()
  benchlib.write(args.out, result)


if __name__ == "__main__":
  main()
