r"""One ensemble train step, member strategies side by side: member-samples/s, GFLOP/s, MFU, compile.

  .venv/bin/python benchmarks/bench_ensemble.py [--quick] [--profile DIR] [--out FILE]
      [--groups strategies,winograd,winograd_128,bf16]
      [--models resnet18,resnet50] [--members 1,3,10] [--batch 32] [--variants auto,loop]

The step is the real one (`cellrep.train.ensemble`): CellSighter's augmentations
of [batch, 16, 60, 60] crops (14 markers as Poisson counts + 2 masks) per member,
ResNet forward and backward, Adam. Variants (`VARIANTS`):

  auto         the default: one program; ``vmap`` over members, or ``lax.map`` over
               member chunks when the saved activations would not fit in 30% of
               memory; convolutions as matrix products on a CPU (conv_impl auto)
  loop         a Python loop of one jitted single-member update, XLA convolutions:
               the loop of jitted members the issue measures against
  loop_im2col  the same loop with convolutions as matrix products
  map_im2col   one program, ``lax.map`` over members one at a time, convolutions as products
  vmap_xla     plain ``vmap`` with XLA convolutions (grouped ones): the accelerator path
  auto_winograd  the default's plan with Winograd 3x3 convolutions
  auto_bf16    the default with ``model.dtype=bfloat16`` (bf16 products accumulating in
               float32, float32 parameters and Adam); its MFU is against the bfloat16
               matmul reference

Case groups (`GROUPS`), each one run written to its own JSON file: ``strategies``
to --out (results/ensemble.json), every other group beside it named after the group
(results/ensemble_<group>.json). The default runs them all (--quick: ``strategies``
only, each selected group as one tiny case); --models, --members, --batch and
--variants replace the selected groups' own values:

  strategies    ResNet-18 and -50, 1, 3 and 10 members, batch 32: the five variants
                above auto_winograd
  winograd      ResNet-18 and -50, one member, batch 32: auto, auto_winograd
  winograd_128  the same at batch 128
  bf16          ResNet-50, one member, batch 32: auto, auto_bf16 (3 rounds)

PyTorch (with the `bench` extra; `torch_ref.train_case`), in the same rounds as every
case: torchvision's resnet18 / resnet50 (the case's model) with ``conv1`` taking the 16
channels and CLASSES outputs, channels_last, Adam (lr 1e-3), forward + cross-entropy +
backward + optimizer step on the same host batch ([batch, 16, 60, 60] float32 crops,
random labels), all cores; float32 (``torch``) and under bf16 autocast (``torch_bf16``).
One torch step trains one network on ``batch`` samples, so its rate is batch / step time,
against cellrep's member-samples/s (members x batch / step time): ``vs_torch`` and
``vs_torch_bf16`` per case are cellrep / torch per variant. Not the same work: cellrep's
step also runs CellSighter's augmentation on the device (Poisson resampling, dilation,
rotation, shifts, flips), torch's step trains on the batch as it is. Porting the
augmentation to torch is not a small job, so instead its cost is measured alone in the
same rounds (``augment``: the jitted augmentation of every member's view, members
vmapped) and reported as a share of ``auto``'s step: the ratio overstates torch's
relative speed by about that share.

All variants share one train state (same shapes and shardings), handed from one to
the next, and run in turn round after round, with a jitted float32 2048^2 matrix
product timed in each round as the machine's reference (`bench_peak.py`):
MFU = model FLOPs / step time / reference FLOP/s of the same run. FLOPs come from
XLA's cost analysis of the compiled programs (`program_flops`: one program per
step, or the loop's member program times M); GFLOP/s and MFU of every variant, and
of PyTorch's step (per member: model FLOPs / M), use the same `model_flops`, those of
the loop with XLA convolutions (im2col products also count the zeros of the padding).
Compile times: the first compile with an empty persistent cache, then again from the
cache.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import benchlib
import torch_ref

# name: (strategy, conv_impl, model dtype)
VARIANTS = {
    "auto": ("auto", "auto", "float32"),
    "loop": ("loop", "xla", "float32"),
    "loop_im2col": ("loop", "im2col", "float32"),
    "auto_winograd": ("auto", "winograd", "float32"),
    "auto_bf16": ("auto", "auto", "bfloat16"),
    "map_im2col": ("map", "im2col", "float32"),
    "vmap_xla": ("vmap", "xla", "float32"),
}
STRATEGY_VARIANTS = ("auto", "loop", "loop_im2col", "map_im2col", "vmap_xla")


@dataclasses.dataclass(frozen=True)
class Group:
  """Cases run together and written to one JSON file: models x members at one batch size."""
  title: str
  models: tuple[str, ...]
  members: tuple[int, ...]
  batch: int
  variants: tuple[str, ...]
  rounds: int = 4


# "strategies" writes --out; every other group the file beside it, ensemble_<group>.json.
GROUPS = {
    "strategies": Group("Ensemble train step", ("resnet18", "resnet50"), (1, 3, 10), 32,
                        STRATEGY_VARIANTS),
    "winograd": Group("Ensemble train step, Winograd 3x3 convolutions", ("resnet18", "resnet50"),
                      (1,), 32, ("auto", "auto_winograd")),
    "winograd_128": Group("Ensemble train step, Winograd 3x3 convolutions, batch 128",
                          ("resnet18", "resnet50"), (1,), 128, ("auto", "auto_winograd")),
    "bf16": Group("Ensemble train step, bfloat16 products", ("resnet50",), (1,), 32,
                  ("auto", "auto_bf16"), rounds=3),
}
MAIN_GROUP = "strategies"
CHANNELS = 16  # 14 markers + the two masks
CLASSES = 8
REFERENCE_N = 2048


def host_batch(batch: int, channels: int, size: int, seed: int = 0) -> dict:
  """Crops like a MIBI store's: Poisson marker counts, 0/1 masks; labels."""
  import numpy as np
  rng = np.random.default_rng(seed)
  markers = rng.poisson(3.0, size=(batch, channels - 2, size, size))
  masks = rng.random((batch, 2, size, size)) < 0.3
  crop = np.concatenate([markers, masks], axis=1).astype(np.float32)
  return {"crop": crop, "label": rng.integers(0, CLASSES, batch).astype(np.int32)}


def build(name: str, members: int, batch_size: int, size: int, variants, *, width=1.0,
          stem="imagenet"):
  """Shared state and batch, and per variant its step with compile times and FLOPs."""
  import jax
  import optax
  from cellrep.data import augment
  from cellrep.data.pipeline import data_sharding, to_device
  from cellrep import models
  from cellrep.train.ensemble import MemberStep, make_mesh, make_train_step
  from cellrep.train.state import abstract_state, create_state

  def get_model(name, classes, **kwargs):
    return models.build({"name": name, "num_classes": classes, **kwargs})

  mesh = make_mesh(1, 1)
  tx = optax.adam(1e-3)
  shape = (1, size, size, CHANNELS)
  preprocess = functools.partial(augment.augment, input_size=size)
  batch = to_device(host_batch(batch_size, CHANNELS, size), data_sharding(mesh))
  rng = jax.random.key(1)
  abstract = abstract_state(get_model(name, CLASSES, width=width, stem=stem), tx, shape, members,
                            mesh)
  state = create_state(jax.random.key(0), get_model(name, CLASSES, width=width, stem=stem), tx,
                       shape, members, mesh)
  steps = {}
  for variant in variants:
    strategy, conv_impl, dtype = VARIANTS[variant]
    model = get_model(name, CLASSES, width=width, stem=stem, conv_impl=conv_impl, dtype=dtype)
    step = make_train_step(MemberStep(model, tx, preprocess), mesh, abstract, strategy,
                           batch=batch).resolved(batch)
    info = {"strategy": step.strategy, "conv_impl": conv_impl, "dtype": dtype,
            "map_batch": step.map_batch}
    t = time.perf_counter()
    lowered = step.lower(abstract, batch, rng)
    info["lower_s"] = time.perf_counter() - t
    t = time.perf_counter()
    compiled = [(low.compile(), count) for low, count in lowered]
    info["compile_s"] = time.perf_counter() - t
    jax.clear_caches()  # so that this compile reads the persistent cache, not memory
    t = time.perf_counter()
    for low, _ in step.lower(abstract, batch, rng):
      low.compile()
    info["cached_compile_s"] = time.perf_counter() - t  # lowering again + cache read
    info["program_flops"] = sum(benchlib.cost_flops(c) * n for c, n in compiled)
    memory = compiled[0][0].memory_analysis()
    info["temp_gib"] = memory.temp_size_in_bytes / 2**30 if memory else None
    t = time.perf_counter()
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    info["first_call_s"] = time.perf_counter() - t
    steps[variant] = (step, info, [c for c, _ in compiled])
    print(f"  {variant:12s} {info['strategy']}/{info['conv_impl']} compile {info['compile_s']:.1f}s "
          f"(cached {info['cached_compile_s']:.1f}s), {info['program_flops'] / 1e9:.1f} GFLOP/step",
          flush=True)
  if "loop" in steps:
    model_flops = steps["loop"][1]["program_flops"]
  else:  # the XLA-convolution member program, compiled for its cost analysis only
    model = get_model(name, CLASSES, width=width, stem=stem, conv_impl="xla")
    loop = make_train_step(MemberStep(model, tx, preprocess), mesh, abstract, "loop")
    model_flops = sum(benchlib.cost_flops(low.compile()) * n
                      for low, n in loop.lower(abstract, batch, rng))
  return state, batch, rng, steps, model_flops


def augment_case(members: int, batch_size: int, size: int):
  """run(): CellSighter's augmentation alone, of every member's view of the batch (vmapped)."""
  import jax
  from cellrep.data import augment

  crops = jax.device_put(host_batch(batch_size, CHANNELS, size)["crop"])
  keys = jax.random.split(jax.random.key(2), members)
  fn = jax.jit(jax.vmap(functools.partial(augment.augment, input_size=size), in_axes=(0, None)))

  def run():
    jax.block_until_ready(fn(keys, crops))

  run()
  return run


def torch_cases(name: str, batch_size: int, size: int) -> dict:
  """{"torch": (run, info), "torch_bf16": ...}: PyTorch's train step on the same host batch;
  {} without torch. Full width, ImageNet stem (torchvision's), whatever the case's model_kw."""
  host = host_batch(batch_size, CHANNELS, size)
  cases = {key: torch_ref.train_case(host["crop"], host["label"], name, CLASSES, dtype)
           for key, dtype in torch_ref.CASES.items()}
  return {key: c for key, c in cases.items() if c}


def run_case(name, members, batch_size, size, variants, rounds, profile_dir="", **model_kw):
  import jax

  from bench_peak import reference_cases, reference_gflops

  print(f"{name} x{members}, batch {batch_size}, {size}x{size}:", flush=True)
  state, batch, rng, steps, model_flops = build(name, members, batch_size, size, variants,
                                                **model_kw)
  held = {"state": state}

  def runner(step):
    def run():
      held["state"], metrics = step(held["state"], batch, rng)
      jax.block_until_ready(metrics)
    return run

  cases = {v: runner(step) for v, (step, _, _) in steps.items()}
  tcases = torch_cases(name, batch_size, size)
  cases.update({key: run for key, (run, _) in tcases.items()})
  cases["augment"] = augment_case(members, batch_size, size)
  # The float32 reference, and that of every other dtype the variants compute in.
  dtypes = sorted({"float32"} | {info["dtype"] for _, info, _ in steps.values()}
                  | {info["dtype"] for _, info in tcases.values()})
  ref_cases, ref_flops = reference_cases(dtypes, REFERENCE_N)
  cases.update(ref_cases)
  for run in cases.values():  # warm-up: clear_caches above left the jit caches empty
    run()
  timing = benchlib.interleave(cases, rounds)
  refs, ref_times = reference_gflops(timing, ref_flops)
  ref_gflops = refs["float32"]
  out = {"model": name, "members": members, "batch": batch_size, "input": [size, size, CHANNELS],
         "model_kwargs": model_kw, "rounds": rounds, "model_flops": model_flops,
         "reference_f32_gflops": ref_gflops, "reference_gflops": refs,
         "reference_times": ref_times, "variants": {}}
  for variant, (step, info, compiled) in steps.items():
    t = timing[variant]
    r = dict(info, **t)
    r["member_samples_per_s"] = members * batch_size / t["median_wall_s"]
    r["gflops"] = model_flops / t["median_wall_s"] / 1e9
    r["mfu"] = r["gflops"] / refs[info["dtype"]]
    out["variants"][variant] = r
    print(f"  {variant:12s} {t['median_wall_s']:7.2f} s/step  {r['member_samples_per_s']:7.1f} "
          f"member-samples/s  {r['gflops']:6.1f} GFLOP/s  MFU {100 * r['mfu']:4.1f}%", flush=True)
    benchlib.profile(profile_dir, f"{name}_x{members}_b{batch_size}_{variant}", cases[variant],
                     compiled)
  base = out["variants"].get("loop")
  if base:
    out["vs_loop"] = {v: r["member_samples_per_s"] / base["member_samples_per_s"]
                      for v, r in out["variants"].items()}
  best_loop = max((r["member_samples_per_s"] for v, r in out["variants"].items()
                   if v.startswith("loop")), default=None)
  if best_loop and "auto" in out["variants"]:
    out["auto_vs_best_loop"] = out["variants"]["auto"]["member_samples_per_s"] / best_loop
  for key, (_, info) in tcases.items():
    t = timing[key]
    # One network per step: samples/s of one member; FLOPs of one member's share of the step.
    r = dict(info, **t, samples_per_s=batch_size / t["median_wall_s"],
             gflops=model_flops / members / t["median_wall_s"] / 1e9)
    r["mfu"] = r["gflops"] / refs[info["dtype"]]
    out[key] = r
    out[f"vs_{key}"] = {v: x["member_samples_per_s"] / r["samples_per_s"]
                        for v, x in out["variants"].items()}
    print(f"  {key:12s} {t['median_wall_s']:7.2f} s/step  {r['samples_per_s']:7.1f} samples/s;"
          f" cellrep / {key}: " + ", ".join(f"{v} {x:.2f}x" for v, x in out[f"vs_{key}"].items()),
          flush=True)
  aug = timing["augment"]
  out["augment"] = dict(aug)
  if "auto" in out["variants"]:
    out["augment"]["share_of_auto"] = (aug["median_wall_s"]
                                       / out["variants"]["auto"]["median_wall_s"])
  print(f"  augment      {aug['median_wall_s']:7.3f} s ({members} members' views)", flush=True)
  print(f"  reference matmul {ref_gflops:.1f} GFLOP/s; load {benchlib.load()}", flush=True)
  return out


def plan(group: Group, args) -> tuple[list[tuple], list[str], int]:
  """(cases as (model, members, batch, size, model_kw), variants, rounds) of one group,
  with the command line's overrides."""
  variants = args.variants.split(",") if args.variants else list(group.variants)
  rounds = args.repeats or (1 if args.quick else group.rounds)
  if args.quick:
    return [("resnet18", 2, 4, 16, {"width": 0.0625, "stem": "small"})], variants, rounds
  models = args.models.split(",") if args.models else group.models
  members = [int(k) for k in args.members.split(",")] if args.members else group.members
  batch = args.batch or group.batch
  return [(m, k, batch, 60, {}) for m in models for k in members], variants, rounds


def main():
  p = benchlib.parser(__doc__, "ensemble")
  p.add_argument("--groups", default="",
                 help=f"comma-separated case groups of {','.join(GROUPS)} (default: all; "
                      f"with --quick {MAIN_GROUP})")
  p.add_argument("--models", default="", help="replace the groups' models, e.g. resnet18,resnet50")
  p.add_argument("--members", default="", help="replace the groups' member counts, e.g. 1,3,10")
  p.add_argument("--batch", type=int, default=0, help="replace the groups' batch size")
  p.add_argument("--variants", default="", help="replace the groups' variants, e.g. auto,loop")
  args = p.parse_args()
  groups = (args.groups.split(",") if args.groups
            else [MAIN_GROUP] if args.quick else list(GROUPS))
  unknown = sorted(set(groups) - set(GROUPS)) + sorted(
      set(args.variants.split(",") if args.variants else ()) - set(VARIANTS))
  if unknown:
    p.error(f"unknown group or variant {', '.join(unknown)}; groups: {', '.join(GROUPS)}, "
            f"variants: {', '.join(VARIANTS)}")
  benchlib.setup_jax()
  for group in groups:
    cases, variants, rounds = plan(GROUPS[group], args)
    out = benchlib.companion(args.out, "" if group == MAIN_GROUP else f"_{group}")
    result = benchlib.header("ensemble", args)
    result["group"] = group
    result["title"] = GROUPS[group].title
    result["variants"] = {v: {"strategy": s, "conv_impl": c, "dtype": d}
                          for v, (s, c, d) in VARIANTS.items()}
    result["cases"] = []
    print(f"== {group}: {GROUPS[group].title} -> {out}", flush=True)
    for name, members, batch_size, size, kw in cases:
      result["cases"].append(run_case(name, members, batch_size, size, variants, rounds,
                                      args.profile, **kw))
      result["load_average_end"] = benchlib.load()
      benchlib.write(out, result)  # after every case: a long run leaves what it measured


if __name__ == "__main__":
  main()
