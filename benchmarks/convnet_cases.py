"""What bench_efficientnet.py and bench_unet.py share: cellrep's cases of one network family.

A benchmark subclasses `Builder` with its network (`model`), optimizer (`optimizer`), host
batch (`host_data`), member step (`member_step`), `VARIANTS` table and the name of its
inference task (`infer_task`: ``features``, ``embed``); `build_cases`, `model_flops` and
`finish` then serve both tasks, ``train`` and that one.
"""

from __future__ import annotations

import time

import benchlib


class Builder:
  """cellrep's cases of one (members, batch, size): `case("train", variant)` and
  `case(infer_task, variant)` give (run(compiled programs) -> callable, info,
  [(lowered program, calls per step)])."""

  variants: dict = {}  # name: (conv_impl, dtype)
  infer_task = "infer"
  layer = ""
  channels = 1

  def model(self, conv_impl: str, dtype: str):
    raise NotImplementedError

  def optimizer(self):
    raise NotImplementedError

  def host_data(self, batch: int, size: int) -> dict:
    """The host batch, NHWC: {"crop": [batch, size, size, channels], ...}."""
    raise NotImplementedError

  def member_step(self, conv_impl: str, dtype: str):
    from cellrep.train.ensemble import MemberStep
    return MemberStep(self.model(conv_impl, dtype), self.tx, lambda key, crop: crop)

  def __init__(self, members: int, batch: int, size: int):
    import jax
    from cellrep.data.pipeline import data_sharding, to_device
    from cellrep.train.ensemble import make_mesh
    from cellrep.train.state import abstract_state, create_state, create_variables

    self.members, self.batch, self.size = members, batch, size
    self.mesh = make_mesh(1, 1)
    self.tx = self.optimizer()
    self.data = to_device(self.host_data(batch, size), data_sharding(self.mesh))
    shape = (1, size, size, self.channels)
    model = self.model("auto", "float32")
    self.abstract = abstract_state(model, self.tx, shape, members, self.mesh)
    self.state = {"state": create_state(jax.random.key(0), model, self.tx, shape, members,
                                        self.mesh)}
    self.variables = create_variables(jax.random.key(0), model, shape, members, self.mesh)
    self.rng = jax.random.key(1)

  def case(self, task: str, variant: str):
    if task == "train":
      return self.train(variant)
    if task == self.infer_task:
      return self.infer(variant)
    raise ValueError(f"unknown task {task}")

  def train(self, variant: str):
    import jax
    from cellrep.train.ensemble import make_train_step

    conv_impl, dtype = self.variants[variant]
    step = make_train_step(self.member_step(conv_impl, dtype), self.mesh, self.abstract, "auto",
                           batch=self.data).resolved(self.data)
    lowered = step.lower(self.abstract, self.data, self.rng)
    info = {"strategy": step.strategy, "map_batch": step.map_batch, "conv_impl": conv_impl,
            "dtype": dtype}
    held, data, rng = self.state, self.data, self.rng

    def run(compiled):
      (program, _), = compiled  # vmap and map steps are one program
      def call():  # a train step drawing RNG from the state's step: fresh ones every call
        held["state"], metrics = program(held["state"], data, rng)
        jax.block_until_ready(metrics)
      return call

    return run, info, lowered

  def infer(self, variant: str):
    """`cellrep.infer.embed.make_embed_fn` to `layer`, the variant's policy."""
    import jax
    from cellrep.infer.embed import make_embed_fn
    from cellrep.infer.predict import as_policy

    conv_impl, dtype = self.variants[variant]
    model = self.model(conv_impl, "float32")
    policy = as_policy("auto", model, dtype=dtype)
    fn = make_embed_fn(model, lambda crop: crop, self.mesh, (self.layer,), policy)
    lowered = [(fn.lower(self.variables, self.data["crop"]), 1)]
    info = {"strategy": policy.predict_strategy, "map_batch": policy.predict_map_batch,
            "conv_impl": policy.predict_conv_impl, "dtype": policy.predict_dtype}
    variables, crops = self.variables, self.data["crop"]

    def run(compiled):
      (program, _), = compiled
      return lambda: jax.block_until_ready(program(variables, crops))

    return run, info, lowered


def build_cases(builder: Builder, task: str, variants) -> dict:
  """{variant: (run, info, compiled programs)}, ``auto`` variants that lower to the same
  program as their implementation sharing its case (info["same_program_as"])."""
  table = builder.variants
  cases, texts = {}, {}
  for variant in sorted(variants, key=lambda v: table[v][0] == "auto"):  # auto last
    make_run, info, lowered = builder.case(task, variant)
    text = "\n".join(low.as_text() for low, _ in lowered)
    twin = next((v for v, t in texts.items() if t == text), None)
    if twin is not None:
      cases[variant] = (cases[twin][0], dict(info, same_program_as=twin), cases[twin][2])
      print(f"  {task} {variant:12s} = {twin} (the same program)", flush=True)
      continue
    texts[variant] = text
    t = time.perf_counter()
    compiled = [(low.compile(), n) for low, n in lowered]
    info["compile_s"] = time.perf_counter() - t
    info["program_flops"] = sum(benchlib.cost_flops(c) * n for c, n in compiled)
    if (table[variant] == ("xla", "float32") and builder.members == 1
        and task == builder.infer_task):
      _MODEL_FLOPS[_flops_key(builder, task)] = info["program_flops"]
    memory = compiled[0][0].memory_analysis()
    info["temp_gib"] = memory.temp_size_in_bytes / 2**30 if memory else None
    run = make_run(compiled)
    t = time.perf_counter()
    run()
    info["first_call_s"] = time.perf_counter() - t
    cases[variant] = (run, info, [c for c, _ in compiled])
    print(f"  {task} {variant:12s} {info['strategy']}/{info['conv_impl']}/{info['dtype']} "
          f"compile {info['compile_s']:.0f} s, first call {info['first_call_s']:.2f} s", flush=True)
  return cases


# (builder class, task, batch, size): one network's FLOPs (`model_flops`).
_MODEL_FLOPS: dict[tuple, float] = {}


def _flops_key(builder: Builder, task: str) -> tuple:
  return (type(builder), task, builder.batch, builder.size)


def model_flops(builder: Builder, task: str) -> float:
  """One network's FLOPs of `task` with XLA convolutions: train, 3 x its train-mode forward
  pass and loss (`train_forward_flops`); the inference task, those of the one-network xla_f32
  program (an earlier part's), else that program compiled for its cost analysis alone."""
  key = _flops_key(builder, task)
  if key not in _MODEL_FLOPS and task == "train":
    _MODEL_FLOPS[key] = 3 * train_forward_flops(builder)
  if key not in _MODEL_FLOPS:
    one = builder if builder.members == 1 else type(builder)(1, builder.batch, builder.size)
    _, _, lowered = one.case(task, "xla_f32")
    _MODEL_FLOPS[key] = sum(benchlib.cost_flops(low.compile()) * n for low, n in lowered)
  return _MODEL_FLOPS[key]


def train_forward_flops(builder: Builder) -> float:
  """XLA's FLOPs of one network's train-mode forward pass and loss (`MemberStep.loss`, the
  builder's member step), XLA convolutions, float32."""
  import jax

  member = builder.member_step("xla", "float32")
  one = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), builder.abstract)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in builder.data.items()}
  rngs = member.rngs(jax.random.key(0), 0, 0)
  forward = jax.jit(lambda params, stats, b: member.loss(params, stats, b["crop"], b, rngs)[0])
  return benchlib.cost_flops(forward.lower(one.params, one.batch_stats, batch).compile())


def finish(cases: list, refs: dict, same: tuple = ("task", "members")) -> None:
  """MFU of every row (÷ the matmul reference of its dtype) and vs_torch of every variant:
  PyTorch float32's time / the variant's, PyTorch of its own part or, for a part without
  one, of another part's with the same `same` keys (``torch_from_part``)."""
  for c in cases:
    torch = c.get("torch")
    if torch is None:
      peer = next((d for d in cases if "torch" in d and all(d[k] == c[k] for k in same)), None)
      if peer is not None:
        torch, c["torch_from_part"] = peer["torch"], peer["part"]
    for r in [*c["variants"].values(), *(c[k] for k in ("torch", "torch_bf16") if k in c)]:
      r["mfu"] = r["gflops"] / refs.get(r["dtype"], float("nan"))
    for r in c["variants"].values():
      if torch is not None:
        r["vs_torch"] = torch["median_wall_s"] / r["median_wall_s"]


def nan_refs() -> dict:
  return {"float32": float("nan"), "bfloat16": float("nan")}


def done(result: dict, part: str, start: float) -> None:
  """Record and print one part's wall seconds (``part_s``)."""
  result["part_s"][part] = time.perf_counter() - start
  print(f"  {part}: {result['part_s'][part]:.0f} s", flush=True)
