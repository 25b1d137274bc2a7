"""Check a config against a Cloud TPU slice before paying for it: the real step compiled ahead.

  python -m sce_jax.aot --config=configs/imagenet_r50.py --topology=v5e:4x4
  python -m sce_jax.aot --config=configs/cifar10_r18.py:smoke --topology=v5e-4 --max-batch \\
      --json check.json

libtpu (the [tpu] extra) describes a slice's chips (`jax.experimental.topologies`); XLA
compiles the step of `train.build` for them on this machine's CPU, with the abstract state of
`jax.eval_shape` and the batch as ShapeDtypeStructs, so no array is allocated and no TPU is
reached. The compiled program tells, per chip: the HBM it needs against the chip's, its FLOPs
against the analytic count of docs/SCE.md section 11, and the collectives of its optimised HLO
(the gradient all-reduce against 4 bytes per trainable parameter). --max-batch finds the largest
per-chip batch that fits. The same config flags as `sce_jax.main`. Exit status 1, with one
line, when the config does not fit. XLA's `optimal_seconds` estimate is not a time (it comes out
negative for a ResNet step) and is not reported.
"""
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import sys
import time

import flax.linen as nn
import jax
from absl import app, flags
from jax.experimental import topologies

from sce_jax import cli, losses, methods, schema, sharding, train
from sce_jax import config as sce_config
from sce_jax.data import crop, resident

_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "A slice as libtpu names it (v5e:4x4, v4:2x2x2, v5p:2x2x1, v6e:2x2) or "
    "as gcloud's --accelerator-type (v5litepod-16, v4-32, v5p-8, v6e-4).")
_MAX_BATCH = flags.DEFINE_bool("max-batch", False, "Also find the largest per-chip batch that "
                               "fits: two compiles, a line through them, one to confirm.")
_JSON = flags.DEFINE_string("json", None, "Write the results here.")
_HLO = flags.DEFINE_string("hlo", None, "Write the step's optimised HLO here: its op_name "
                           "metadata says where each collective comes from.")
_NUM_EXAMPLES = flags.DEFINE_integer(
    "num_examples", None, "Training images (the size of the set held on the chips with "
    "data.on_device); default: the known size of config.data.name.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Classes of the online probe; "
                                    "default: those of config.data.name.")
flags.mark_flags_as_required(["config", "topology"])


@dataclasses.dataclass(frozen=True)
class Chip:
  hbm_gib: float
  megacore: bool   # two TensorCores that JAX sees as one device (libtpu's "megacore" config)
  dims: int        # of the slice's topology, e.g. 4x4 (2) or 2x2x4 (3)
  per_core: bool   # gcloud's accelerator types count TensorCores, not chips (v4-8 is 4 chips)


# HBM per chip, from Google's Cloud TPU pages: v4 32 GiB (https://cloud.google.com/tpu/docs/v4),
# v5e 16 GiB (https://cloud.google.com/tpu/docs/v5e), v5p 95 GiB
# (https://cloud.google.com/tpu/docs/v5p), v6e 32 GiB (https://cloud.google.com/tpu/docs/v6e).
CHIPS = {
    "v4": Chip(32, megacore=True, dims=3, per_core=True),
    "v5e": Chip(16, megacore=False, dims=2, per_core=False),
    "v5p": Chip(95, megacore=True, dims=3, per_core=True),
    "v6e": Chip(32, megacore=False, dims=2, per_core=False),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}  # gcloud's and libtpu's names

# (training images, classes) of the data sets of configs/, for the probe and a resident set.
DATA_SETS = {"cifar10": (50_000, 10), "cifar100": (50_000, 100), "stl10": (105_000, 10),
             "tiny_imagenet": (100_000, 200), "imagenet2012": (1_281_167, 1000)}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
GIB = 2**30


class AotError(ValueError):
  """A slice or config this check cannot compile; the message says what to pass instead."""


def topology(name):
  """(chip family, libtpu topology name) of `name`: 'v5e:4x4' as it is, or gcloud's
  accelerator type ('v5litepod-16', 'v4-32') laid out as Cloud TPU lays out slices of a power
  of two chips (v4-32: 16 chips, 2x2x4)."""
  family, sep, rest = re.split(r"([:-])", name, maxsplit=1) if re.search("[:-]", name) else (
      name, "", "")
  family = ALIASES.get(family, family)
  if family not in CHIPS or not rest:
    raise AotError(f"--topology={name!r} is not a TPU slice; pass one such as v5e:4x4, "
                   f"v4:2x2x2 or v5litepod-16 (chips: {', '.join(CHIPS)}).")
  chip = CHIPS[family]
  if sep == ":":
    return family, f"{family}:{rest}"
  n = int(rest) // (2 if chip.per_core else 1) if rest.isdigit() else 0
  shape = [2, 2, 1] if chip.dims == 3 else [1, 1]  # the smallest slices: v4-8, v5litepod-1
  if n < math.prod(shape) or n & (n - 1):
    raise AotError(f"--topology={name!r}: give its layout, e.g. {family}:"
                   f"{'x'.join(['4'] * chip.dims)} (only slices of a power of two chips are "
                   "laid out here).")
  while math.prod(shape) < n:  # double the last of the smallest: 2x2x1, 2x2x2, 2x2x4, 2x4x4
    shape[max(i for i, d in enumerate(shape) if d == min(shape))] *= 2
  return family, f"{family}:{'x'.join(map(str, shape))}"


def devices(family, name):
  """The abstract devices of a slice, one per chip (megacore on v4 and v5p, as a TPU VM)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # its lock file is for TPU owners
  options = {"chip_config_name": "megacore"} if CHIPS[family].megacore else {}
  dims = [int(d) for d in re.findall(r"\d+", name.partition(":")[2])]
  if math.prod(dims) < 4:  # a slice smaller than libtpu's default host of 2x2x1 chips
    options["chips_per_host_bounds"] = (*dims, *[1] * (3 - len(dims)))
  try:
    return topologies.get_topology_desc(name, "tpu", **options).devices
  except RuntimeError as e:
    raise AotError(f"no TPU description of {name} ({str(e).splitlines()[0]}); install libtpu "
                   "with `pip install -e '.[tpu]'` and check the topology.") from e


def data_size(config, num_examples=None, num_classes=None):
  """(training images, classes): those given, else those of config.data.name."""
  known = DATA_SETS.get(config.data.name, (None, None))
  num_examples, num_classes = (num_examples or known[0]), (num_classes or known[1])
  if num_examples is None or num_classes is None:
    raise AotError(f"the size of data set {config.data.name!r} is not known here; pass "
                   "--num_examples=N --num_classes=C.")
  return num_examples, num_classes


def step_inputs(config, parts, mesh, on_device, num_examples):
  """The step's arguments as ShapeDtypeStructs with its shardings: the abstract state (replicated,
  or its parameters and optimiser state split with sharding.params='fsdp'), and the batch as
  train.py feeds it (host-cropped uint8 views; with data.host_stage=decode the host's decoded
  images, `crop.decode_batch_shapes`; or the resident set, flat as `resident.flat` holds square
  images, and indices)."""
  spec = lambda shape, dtype, where: jax.ShapeDtypeStruct(shape, dtype, sharding=where)
  rows, n = sharding.rows(mesh), config.batch_size
  state = jax.eval_shape(parts.init, jax.random.key(0))  # with init's shardings (state.shardings)
  if on_device:
    size, where = config.data.image_size, resident.batch_sharding(mesh)
    batch = {"index": spec((n,), "int32", where["index"]),
             "images": spec((num_examples, size * size * 3), "uint8", where["images"]),
             "labels": spec((num_examples,), "int32", where["labels"])}
  elif config.data.host_stage == "decode":
    batch = {k: spec(shape, dtype, rows) for k, (shape, dtype) in
             crop.decode_batch_shapes(n, config.data.decode_size).items()}
  else:
    batch = {"views": tuple(spec((n, v.size, v.size, 3), "uint8", rows) for v in parts.views),
             "label": spec((n,), "int32", rows)}
  return state, batch


def held_on_chip(config, family, num_examples):
  """data.on_device holds the set on every chip when it takes at most resident's share of a
  chip's memory, as `resident.load` decides on the slice."""
  need = num_examples * config.data.image_size**2 * 3
  return config.data.on_device and need <= resident.MEMORY_FRACTION * CHIPS[family].hbm_gib * GIB


def with_batch(config, global_batch):
  """`config` at another global batch; the queue keeps its length up to a multiple of the keys
  written each step (docs/SCE.md 3), as schema.validate asks."""
  config = config.copy_and_resolve_references()
  config.unlock()
  written = global_batch * schema.num_target_views(config)
  config.batch_size = global_batch
  config.sce.queue = max(1, round(config.sce.queue / written)) * written
  return config


@dataclasses.dataclass
class Compiled:
  """One compile of the step: what a chip needs, and the program when it fits."""
  batch_per_chip: int
  hbm_bytes: int      # arguments + outputs - aliased (the donated state) + temporaries
  compile_s: float
  program: object     # jax.stages.Compiled, or None when XLA ran out of HBM
  parts: object       # train.Parts
  state: object       # the abstract TrainState

  @property
  def fits(self):
    return self.program is not None


def _out_of_memory(error, arguments):
  """What a chip would need, from XLA's message when a program exceeds HBM (its temporaries)
  and the step's arguments, or None for another error."""
  units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # XLA's HumanReadableNumBytes
  match = re.search(r"temporaries \(([\d.]+)([KMGT]?)\)", str(error))
  return None if match is None else float(match[1]) * units[match[2]] + arguments


def per_chip(tree):
  """Bytes of a chip's shards of `tree`'s ShapeDtypeStructs."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def compile_step(config, devs, family, num_examples, num_classes):
  """The step of `config` compiled for the abstract devices `devs`."""
  mesh = sharding.make_mesh(devs)
  on_device = held_on_chip(config, family, num_examples)
  parts = train.build(config, mesh, num_classes=num_classes,
                      steps_per_epoch=max(1, num_examples // config.batch_size),
                      on_device=on_device)
  state, batch = step_inputs(config, parts, mesh, on_device, num_examples)
  arguments = per_chip((state, batch))
  start = time.perf_counter()
  try:
    program = parts.step.lower(state, batch).compile()
  except jax.errors.JaxRuntimeError as e:
    need = _out_of_memory(e, arguments)
    if need is None:
      raise
    return Compiled(config.batch_size // len(devs), int(need), time.perf_counter() - start,
                    None, parts, state)
  m = program.memory_analysis()
  need = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
          m.temp_size_in_bytes)
  return Compiled(config.batch_size // len(devs), need, time.perf_counter() - start, program,
                  parts, state)


def _bytes(shapes):
  """Bytes of an HLO result type: 'f32[64,3]{1,0}' or a tuple of them."""
  size = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
  return sum(size.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", shapes))


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (.+?) ([a-z][\w-]*)\((.*)$")


def collectives(hlo):
  """Collectives of an optimised HLO module, by kind: count and bytes (the size of each op's
  result on a chip: the summed buffer of an all-reduce, the gathered one of an all-gather, a
  chip's share of a reduce-scatter).

  An op is one channel: XLA:TPU spreads an asynchronous collective over many fusions that each
  repeat it with its channel_id (the 50 "all-gathers" of a ResNet-50 step are its queue's two,
  the target keys of its two views); an -start/-done pair counts once, with the -done's result.
  Also the float32 and other bytes of the backward pass's all-reduces (op_name
  'transpose(...)'; with optim.accum_steps, the one XLA:TPU moves out of the micro-batches'
  loop is named after the loop, 'jit(step)/while'): the gradients, and BatchNorm's backward sums
  beside them.
  """
  starts, ops = {}, {}  # -start name -> its attributes; (kind, channel) -> (bytes, f32, grad)
  for number, line in enumerate(hlo.splitlines()):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shapes, opcode, rest = match.groups()
    kind = opcode.removesuffix("-start").removesuffix("-done")
    if kind not in COLLECTIVES:
      continue
    if opcode.endswith("-start"):
      starts[name] = rest
      continue
    if opcode.endswith("-done"):
      rest = starts.get(re.match(r"%?([^\s,)]+)", rest)[1], rest)
    channel = re.search(r"channel_id=(\d+)", rest)
    key = (kind, channel[1] if channel else f"line {number}")
    f32 = _bytes(" ".join(re.findall(r"\bf32\[[\d,]*\]", shapes)))
    old = ops.get(key, (0, 0, False))
    grad = "transpose(" in rest or 'op_name="jit(step)/while"' in rest
    ops[key] = (max(old[0], _bytes(shapes)), max(old[1], f32), grad)
  out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
  grads = {"f32_bytes": 0, "other_bytes": 0}
  for (kind, _), (size, f32, grad) in ops.items():
    out[kind]["count"] += 1
    out[kind]["bytes"] += size
    if kind == "all-reduce" and grad:
      grads["f32_bytes"] += f32
      grads["other_bytes"] += size - f32
  return out, grads


def forward_flops(model, variables, size):
  """FLOPs of `model`'s forward pass on one size x size image: 2 x the multiply-adds of its
  convolutions and dense layers (docs/SCE.md 11), counted from their shapes, in training mode
  (with a dropout key for a ViT's drop_path, as the step has)."""
  flops = []

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
      window = math.prod(getattr(context.module, "kernel_size", ()))
      flops.append(2 * math.prod(out.shape) * window * args[0].shape[-1])
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(lambda v: model.apply(v, jax.numpy.zeros((1, size, size, 3)), train=True,
                                         mutable=["batch_stats"],
                                         rngs={"dropout": jax.random.key(0)}), variables)
  return sum(flops)


def step_flops(config, parts, state):
  """The analytic FLOPs of one step over the global batch B (docs/SCE.md 11): the target's
  forward pass on its views, the online network's forward and backward (3 x its forward) on
  its views, and the loss's similarities: per pair q . keys and its gradient, per target view
  z . keys, each 2 x B x columns x D."""
  online = {"params": state.params, "batch_stats": state.batch_stats}
  target = {"params": state.target_params, "batch_stats": state.target_batch_stats}
  size = lambda i: parts.views[i].size
  b = config.batch_size
  target_views = losses.target_views(parts.pairs)
  online_views = losses.online_views(parts.pairs)
  if parts.target is None:  # a method without EMA target: the online network embeds every view
    target_views, online_views = [], sorted({*target_views, *online_views})
  nets = (sum(forward_flops(parts.target, target, size(i)) for i in target_views) +
          3 * sum(forward_flops(parts.online, online, size(j)) for j in online_views))
  columns = ((config.sce.queue if methods.get(config.method).uses_queue(config) else 0) +
             (b if losses.uses_batch(config.sce.negatives) else 1))
  similarity = 2 * b * columns * config.model.projector.out_dim
  loss = similarity * (2 * len(parts.pairs) + len(target_views))
  return b * nets + loss


def granule(config, chips):
  """Per-chip batches step by this: 8 rows (a TPU sublane tile) a micro-batch
  (optim.accum_steps), and a global batch that splits into the shuffle-BN groups."""
  splits = config.sce.target_bn_splits
  return math.lcm(8 * config.optim.accum_steps,
                  splits // math.gcd(splits, chips) if splits else 1)


def max_batch(first, compile_at, capacity, step, tries=3):
  """The largest per-chip batch (a multiple of `step`) whose step fits `capacity` bytes, and
  its Compiled. Memory is a line in the batch through two compiles (`first`, and 8 times or an
  eighth of its batch: far enough apart that the activations' share shows, and a compile that
  runs out of memory stops early); one more compile confirms the line's prediction. A
  prediction that does not fit brackets the answer with the largest batch that does, and the
  line through those two gives the next try (`tries` in all); memory that does not grow
  between the two sends the next try 8 times further. compile_at(per_chip_batch) -> Compiled.
  """
  b = first.batch_per_chip
  points = [first, compile_at(8 * b if first.fits else max(step, b // 8 // step * step))]
  batch = lambda p: p.batch_per_chip
  for _ in range(tries):
    fit = max((p for p in points if p.fits), key=batch, default=None)
    over = min((p for p in points if not p.fits and (fit is None or batch(p) > batch(fit))),
               key=batch, default=None)
    ordered = sorted(points, key=batch)
    if fit and over:
      line = [fit, over]
    else:  # the two largest that fit, or the two smallest that do not
      line = ordered[-2:] if fit else ordered[:2]
    (b0, m0), (b1, m1) = sorted((batch(p), p.hbm_bytes) for p in line)
    predicted = m1 > m0
    if predicted:
      guess = int((b0 + (capacity - m0) * (b1 - b0) / (m1 - m0)) // step * step)
    else:  # fixed costs hide the activations' share at these batches: look 8 times further
      guess = 8 * b1 if fit and not over else 0
    if guess < step or guess in [batch(p) for p in points]:
      break
    points.append(compile_at(guess))
    if points[-1].fits and over is None and predicted:
      break  # the line's prediction, confirmed
  best = max((p for p in points if p.fits), key=batch, default=None)
  return (batch(best) if best else 0), best


def check(config, name, find_max_batch=False, num_examples=None, num_classes=None, hlo=None,
          log=print):
  """The check of `config` on slice `name` (see the module's docstring), as a dict; the data
  set's size by `data_size`; the optimised HLO written to the file `hlo`, if given."""
  family, name = topology(name)
  devs = devices(family, name)
  chips, processes = len(devs), len({d.process_index for d in devs})
  schema.validate(config, chips, processes)
  num_examples, num_classes = data_size(config, num_examples, num_classes)
  capacity = CHIPS[family].hbm_gib * GIB
  log(f"Compiling the step of batch {config.batch_size} for {name} ({chips} chips of "
      f"{devs[0].device_kind}, {processes} process(es))...")

  def compile_at(per_chip):
    out = compile_step(with_batch(config, per_chip * chips), devs, family, num_examples,
                       num_classes)
    log(f"  batch {per_chip} per chip: {out.hbm_bytes / GIB:.2f} GiB"
        f"{'' if out.fits else ' (out of memory)'}, compiled in {out.compile_s:.0f} s")
    return out

  first = compile_step(config, devs, family, num_examples, num_classes)
  result = {
      "topology": name, "chips": chips, "processes": processes,
      "device_kind": devs[0].device_kind, "batch_per_chip": first.batch_per_chip,
      "accum_steps": config.optim.accum_steps,
      "hbm_gib_per_chip": first.hbm_bytes / GIB, "hbm_capacity_gib": capacity / GIB,
      "sharding_params": config.sharding.params,
      "state_gib_per_chip": per_chip(first.state) / GIB,
      "fits": first.fits and first.hbm_bytes <= capacity, "compile_s": first.compile_s,
      "max_batch_per_chip": None, "jax": jax.__version__,
      "libtpu": importlib.metadata.version("libtpu")}
  if find_max_batch:
    log(f"Finding the largest per-chip batch that fits (batch {first.batch_per_chip}: "
        f"{first.hbm_bytes / GIB:.2f} GiB)...")
    best, _ = max_batch(first, compile_at, capacity, granule(config, chips))
    result["max_batch_per_chip"] = best
  program = first.program
  if program is None:
    return {**result, "tflop_per_chip": None, "tflop_vs_analytic": None, "collectives": None,
            "grad_allreduce_vs_params": None, "grad_allreduce_float32": None}
  cost = program.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  text = program.as_text()
  if hlo:
    with open(hlo, "w") as f:
      f.write(text)
  ops, grads = collectives(text)
  params = sum(x.size for x in jax.tree.leaves(first.state.params))
  analytic = step_flops(config, first.parts, first.state) / chips
  return {**result, "tflop_per_chip": cost["flops"] / 1e12,
          "tflop_vs_analytic": cost["flops"] / analytic, "collectives": ops,
          "params": params, "grad_allreduce_bytes": grads["f32_bytes"] + grads["other_bytes"],
          "grad_allreduce_vs_params": (grads["f32_bytes"] + grads["other_bytes"]) / (4 * params),
          "grad_allreduce_float32": grads["other_bytes"] == 0}


def table(r):
  """The check's result as a short Markdown table."""
  mib = lambda n: f"{n / 2**20:,.1f} MiB"
  k = r["accum_steps"]
  rows = [("batch per chip", f"{r['batch_per_chip']}" + (
              f", in {k} micro-batches of {r['batch_per_chip'] // k}" if k > 1 else "")),
          ("HBM per chip", f"{r['hbm_gib_per_chip']:.2f} GiB of {r['hbm_capacity_gib']:g} GiB: "
                           f"{'fits' if r['fits'] else 'does NOT fit'}"),
          ("state (sharding.params)",
           f"{r['state_gib_per_chip']:.3g} GiB ({r['sharding_params']})")]
  if r["max_batch_per_chip"] is not None:
    rows.append(("largest batch per chip that fits", f"{r['max_batch_per_chip']}"))
  if r["collectives"] is not None:
    rows.append(("TFLOP per chip per step", f"{r['tflop_per_chip']:.3g} "
                 f"({r['tflop_vs_analytic']:.2f} x the analytic count)" + (
                     f"; XLA counts the {k} micro-batches' loop body once" if k > 1 else "")))
    rows += [(kind, f"{c['count']} ops, {mib(c['bytes'])}") for kind, c in
             r["collectives"].items()]
    rows.append(("gradient all-reduce", f"{mib(r['grad_allreduce_bytes'])} = "
                 f"{r['grad_allreduce_vs_params']:.3f} x 4 bytes x {r['params']:,} parameters"
                 f"{'' if r['grad_allreduce_float32'] else ', NOT all float32'}"))
  rows.append(("compile", f"{r['compile_s']:.0f} s"))
  return "\n".join([f"{r['topology']}: {r['chips']} chips of {r['device_kind']}, "
                    f"{r['processes']} process(es)", "| per chip | |", "|---|---|",
                    *(f"| {k} | {v} |" for k, v in rows)])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # The check compiles for abstract TPUs on this machine's CPU: JAX runs on the CPU, even on a
  # TPU VM.
  jax.config.update("jax_platforms", "cpu")
  try:
    result = check(cli.CONFIG.value, _TOPOLOGY.value, _MAX_BATCH.value, _NUM_EXAMPLES.value,
                   _NUM_CLASSES.value, _HLO.value)
  except (AotError, sce_config.ConfigError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  print(table(result))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(result, f, indent=1)
  if not result["fits"]:
    print(f"Error: the step needs {result['hbm_gib_per_chip']:.2f} GiB per chip, more than the "
          f"{result['hbm_capacity_gib']:g} GiB of a {result['topology'].split(':')[0]} chip; "
          "lower --config.batch_size or use more chips.", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
