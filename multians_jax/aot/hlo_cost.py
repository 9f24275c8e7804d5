"""FLOPs and bytes of a compiled XLA program with loop trip counts.

``compiled.cost_analysis()`` counts the body of every ``while`` loop once:
an update step that scans 36 layers over 48 micro-batches is reported as
one layer of one micro-batch. This module reads the optimized HLO text
(``compiled.as_text()``) instead and weighs every computation by how often
it runs: the product of the trip counts of the loops around it. A trip
count is the loop's ``known_trip_count`` when XLA recorded one, else read
from its condition (``counter < N`` with the counter's start and N
constants, as ``lax.scan`` / ``fori_loop`` lower); a loop whose condition
depends on data (the sampler's decode loop, which stops when every row
has stopped) takes the bound the caller passes (``bounds``, for loops not
nested in another) or counts once and is reported in ``Cost.unbounded``.

What is counted, per computation and times its multiplicity:

* FLOPs of ``dot`` and ``convolution`` (2 · output elements · contracted
  size), fused or not, and of the GPU library calls that state their
  shapes (cuBLAS GEMMs, cuDNN fused attention: ``custom_call_flops``) and
  of the splash attention's Mosaic kernels, from their query and key
  operands. Element-wise work and other custom calls are not counted: the
  matmuls are the roofline's compute. Other Pallas / Mosaic kernels carry
  no cost in the HLO: their calls are counted (``mosaic_calls``), their
  FLOPs are not. A kernel's bytes are its operands and results, as for any
  instruction.
* Bytes accessed: the operands read and the result written by every
  top-level instruction (a fusion is one instruction: its intermediates
  stay on chip). An operand that an instruction only slices
  (``dynamic-slice`` / ``slice`` / ``gather``, e.g. one layer of stacked
  weights in a layer scan) counts as the slice; an in-place
  ``dynamic-update-slice`` (a KV-cache write) as the update it writes.
  Tuples, parameters, bitcasts and control flow move nothing.

This is the model XLA's own cost analysis uses, applied with trip counts;
tests/test_aot.py checks it against ``cost_analysis()`` on loop-free
programs and against trip count × body on scans.
"""

from __future__ import annotations

import dataclasses
import math
import re

DTYPE_BYTES = {
  "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
  "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
  "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1,
  "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "token": 0,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_HEAD = re.compile(r"^\s*(?:ROOT )?%([^\s=]+) = ")
_NO_TRAFFIC = {
  "parameter", "constant", "tuple", "get-tuple-element", "bitcast",
  "while", "call", "conditional", "after-all", "copy-start", "copy-done",
  "partition-id", "replica-id", "iota", "opt-barrier", "add-dependency",
}  # fmt: skip
_SLICERS = {"dynamic-slice", "slice", "gather"}


@dataclasses.dataclass
class Inst:
  name: str
  type: str  # the result type text
  opcode: str
  operands: list[str]
  attrs: str  # everything after the operand list
  root: bool
  args: str = ""  # the text inside the parentheses (a constant's literal)


def _matching(s: str, i: int) -> int:
  """Index just past the bracket closing the one at s[i]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  stack = []
  for j in range(i, len(s)):
    c = s[j]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return j + 1
  return len(s)


def parse_inst(line: str) -> Inst | None:
  m = _HEAD.match(line)
  if not m:
    return None
  rest = line[m.end() :]
  if rest.startswith("("):  # tuple type
    end = _matching(rest, 0)
  else:
    end = rest.find(" ")
    brace = rest.find("{")
    if 0 <= brace < end:  # layout braces may hold spaces? never; be safe
      end = max(end, _matching(rest, brace))
  typ, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([a-z][\w\-]*)\(", rest)
  if not op:
    return None
  close = _matching(rest, op.end() - 1)
  args = rest[op.end() : close - 1]
  operands = re.findall(r"%([^\s,()]+)", args)
  return Inst(
    m.group(1), typ, op.group(1), operands, rest[close:],
    line.lstrip().startswith("ROOT"), args,
  )  # fmt: skip


def computations(hlo: str) -> dict[str, list[str]]:
  """Compiled HLO text → {computation name: its instruction lines}.

  An instruction's text may span lines (a Mosaic kernel's backend_config
  holds newlines): a line that does not start a new instruction continues
  the one before."""
  comps, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%(\S+) ", line)
    if m and line.rstrip().endswith("{"):
      name = m.group(1)
      comps[name] = []
    elif line.rstrip() == "}":
      name = None
    elif name:
      if _HEAD.match(line) or not comps[name]:
        comps[name].append(line)
      else:
        comps[name][-1] += "\n" + line
  return comps


def entry_name(hlo: str) -> str:
  m = re.search(r"^ENTRY %(\S+) ", hlo, re.MULTILINE)
  if not m:
    raise ValueError("no ENTRY computation in the HLO text")
  return m.group(1)


def shape_of(type_str: str) -> tuple[int, ...]:
  """The dimensions of an array type (the first array of a tuple)."""
  m = _ARRAY.search(type_str)
  return tuple(int(x) for x in m.group(2).split(",") if x) if m else ()


def type_bytes(type_str: str) -> float:
  """Bytes of an array or tuple type (layouts and memory spaces ignored)."""
  total = 0.0
  for dt, dims in _ARRAY.findall(type_str):  # layouts hold no dtype[dims]
    if dt not in DTYPE_BYTES:
      continue
    n = math.prod(int(x) for x in dims.split(",") if x)
    total += n * DTYPE_BYTES[dt]
  return total


def _attr(attrs: str, key: str) -> str | None:
  m = re.search(rf"\b{key}=([^,\s]+(?:\{{[^}}]*\}})?)", attrs)
  return m.group(1) if m else None


def _called(attrs: str, key: str) -> list[str]:
  m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs)
  if m:
    return re.findall(r"%([^\s,]+)", m.group(1))
  m = re.search(rf"\b{key}=%([^\s,)]+)", attrs)
  return [m.group(1)] if m else []


@dataclasses.dataclass
class Cost:
  flops: float = 0.0
  bytes_accessed: float = 0.0
  # (body computation, trip count used, how it was found) per while loop
  loops: list = dataclasses.field(default_factory=list)
  unbounded: list = dataclasses.field(default_factory=list)
  custom_calls: int = 0
  # Mosaic kernels (Pallas on TPU: ``tpu_custom_call``), whose FLOPs and
  # bytes this model cannot see, times their multiplicity
  mosaic_calls: float = 0.0
  # their instruction names (the kernel's, e.g. splash_mqa_fwd), counted
  mosaic_kernels: dict = dataclasses.field(default_factory=dict)
  # other library calls by target (cuDNN's __cudnn$fmha..., cuBLAS), counted
  library_calls: dict = dataclasses.field(default_factory=dict)


def call_target(inst: Inst) -> str:
  """A custom call's ``custom_call_target`` ("" for any other op)."""
  m = re.search(r'custom_call_target="([^"]+)"', inst.attrs)
  return m.group(1) if m else ""


def custom_call_flops(inst: Inst, types: dict) -> float:
  """FLOPs of the GPU library calls whose shapes the HLO states: cuBLAS
  GEMMs (2 · output elements · contracted size, from the call's dot
  dimension numbers) and cuDNN fused attention (queries [B,T,N,H] and keys
  [B,S,K,H], the layout ``jax.nn.dot_product_attention`` passes: 4·B·N·T·S·H
  forward for Q·Kᵀ and P·V, 10·B·N·T·S·H backward for the recomputed Q·Kᵀ
  and four gradient products; dense counts, as XLA's ``dot`` FLOPs are: a
  causal kernel that skips masked blocks does about half); the splash
  kernels (``_splash_flops``). Anything else (another Mosaic kernel, a
  TopK) is 0."""
  target = call_target(inst)
  if target == "tpu_custom_call" and inst.name.startswith("splash_"):
    return _splash_flops(inst, types)
  if target.startswith("__cudnn$fmha"):
    at = inst.attrs.find("operand_layout_constraints={")
    if at < 0:
      return 0.0
    at = inst.attrs.index("{", at)
    arrays = _ARRAY.findall(inst.attrs[at : _matching(inst.attrs, at)])
    if len(arrays) < 2:
      return 0.0
    q, k = ([int(x) for x in d.split(",") if x] for _, d in arrays[:2])
    if len(q) != 4 or len(k) != 4:
      return 0.0
    per = 2.0 * q[0] * q[1] * q[2] * q[3] * k[1]  # one [T,S,H] product
    return per * (5 if "Backward" in target else 2)
  if target.startswith("__cublas$"):
    lhs = shape_of(types.get(inst.operands[0], "")) if inst.operands else ()
    dims = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', inst.attrs)
    if not lhs or not dims:
      return 0.0
    idx = [int(x) for x in re.findall(r"\d+", dims.group(1))]
    contracted = math.prod(lhs[i] for i in idx if i < len(lhs))
    return 2.0 * math.prod(shape_of(inst.type)) * contracted
  return 0.0


# [T,S,H] products per call of the splash kernels: forward Q·Kᵀ and P·V;
# the dq kernel recomputes Q·Kᵀ, then dO·Vᵀ and dS·K; the dkv kernel
# recomputes Q·Kᵀ, then dO·Vᵀ, Pᵀ·dO and dSᵀ·Q.
_SPLASH_PRODUCTS = {"fwd": 2, "dq": 3, "dkv": 4}


def _splash_flops(inst: Inst, types: dict) -> float:
  """A splash kernel's FLOPs from its operands: after the block-mask
  tables (int8) come the queries [..., T, H] and keys [..., S, H] (leading
  dimensions: rows and heads, as vmapped); 2·(rows·heads·T)·S·H per
  product, dense (the kernel skips blocks its mask rules out: a causal
  mask about half)."""
  kind = re.match(r"splash_\w*?_(fwd|dq|dkv)_", inst.name)
  floats = [
    shape_of(types.get(o, ""))
    for o in inst.operands
    if re.match(r"(bf16|f16|f32)\[", types.get(o, ""))
  ]
  if not kind or len(floats) < 2:
    return 0.0
  q, k = floats[0], floats[1]
  if len(q) < 2 or len(k) < 2 or q[-1] != k[-1]:
    return 0.0
  per = 2.0 * math.prod(q[:-1]) * k[-2] * q[-1]
  return per * _SPLASH_PRODUCTS[kind.group(1)]


class Program:
  """A parsed compiled module: instructions by computation, types by name."""

  def __init__(self, hlo: str):
    self.text = hlo
    self.entry = entry_name(hlo)
    self.comps: dict[str, list[Inst]] = {}
    for name, lines in computations(hlo).items():
      self.comps[name] = [i for i in map(parse_inst, lines) if i]
    self.types = {
      c: {i.name: i.type for i in insts} for c, insts in self.comps.items()
    }

  def _const(self, comp: str, name: str) -> int | None:
    """The integer value of ``name`` in ``comp`` when it is a constant (or
    a copy / convert of one)."""
    for _ in range(4):
      inst = next((i for i in self.comps[comp] if i.name == name), None)
      if inst is None:
        return None
      if inst.opcode == "constant":
        m = re.match(r"\s*(-?\d+)", inst.args)
        return int(m.group(1)) if m else None
      if inst.opcode in ("copy", "convert") and inst.operands:
        name = inst.operands[0]
        continue
      return None
    return None

  def trip_count(self, comp: str, w: Inst) -> tuple[int | None, str]:
    """(trip count, source) of the while instruction ``w`` in ``comp``."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', w.attrs)
    if m:
      return int(m.group(1)), "known_trip_count"
    cond = _called(w.attrs, "condition")[0]
    insts = self.comps.get(cond, [])
    root = next((i for i in insts if i.root), None)
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
      return None, "data-dependent condition"
    direction = _attr(root.attrs, "direction")
    by = {i.name: i for i in insts}
    init = self.comps[comp]
    tup = next((i for i in init if i.name == w.operands[0]), None)

    def value(name):  # a constant, or a loop-carried element's init value
      c = self._const(cond, name)
      if c is not None:
        return c
      i = by.get(name)
      if i is not None and i.opcode == "get-tuple-element":
        idx = int(_attr(i.attrs, "index") or -1)
        if tup is not None and tup.opcode == "tuple" and idx >= 0:
          return self._const(comp, tup.operands[idx])
      return None

    a, b = value(root.operands[0]), value(root.operands[1])
    if direction not in ("LT", "GT") or a is None or b is None:
      return None, "data-dependent condition"
    counter = root.operands[0 if direction == "LT" else 1]
    step = self._step(_called(w.attrs, "body")[0], by.get(counter))
    span = b - a if direction == "LT" else a - b
    return max(-(-span // step), 0), "condition"

  def _step(self, body: str, gte: Inst | None) -> int:
    """The increment of the loop counter that ``gte`` (a get-tuple-element
    of the condition's parameter) reads: body ROOT element = counter +
    constant (windowed collective matmuls step by 2); 1 when not found."""
    if gte is None or gte.opcode != "get-tuple-element":
      return 1
    idx = int(_attr(gte.attrs, "index") or -1)
    insts = {i.name: i for i in self.comps.get(body, [])}
    root = next((i for i in insts.values() if i.root), None)
    if root is None or root.opcode != "tuple" or idx >= len(root.operands):
      return 1
    inst = insts.get(root.operands[idx])
    while inst is not None and inst.opcode in ("copy", "convert"):
      inst = insts.get(inst.operands[0])
    if inst is None or inst.opcode != "add":
      return 1
    for o in inst.operands:
      c = self._const(body, o)
      if c is not None and c > 0:
        return c
    return 1

  def cost(self, bounds: dict[str, int] | None = None, default_bound=1):
    """Trip-count-weighted cost. ``bounds``: trip counts for data-dependent
    loops, by a substring of the loop's ``op_name`` metadata or body name
    (``{"": n}`` matches any).

    A computation may be called from several places (a layer body shared
    by calls): multiplicities are summed over the call graph's edges in
    topological order, so every caller's count has arrived before a
    callee passes its own on."""
    out = Cost()
    edges, fused, loop_edges = self._call_graph()
    in_loop = self._inside_loops(edges, loop_edges)
    for comp, inst in loop_edges:
      n, how = self.trip_count(comp, inst)
      body = _called(inst.attrs, "body")[0]
      if n is None and comp not in in_loop:  # a bound is for outer loops
        n = next(
          (v for key, v in (bounds or {}).items()
           if key in inst.attrs or key in body), None,
        )  # fmt: skip
        how = "bound given" if n is not None else how
      if n is None:
        n = default_bound
        out.unbounded.append(body)
      out.loops.append((body, n, how))
      for c in _called(inst.attrs, "body") + _called(inst.attrs, "condition"):
        edges[comp].append((c, float(n)))
    for comp, m in self._multiplicities(edges).items():
      self._add(out, comp, m, comp not in fused)
    return out

  def _call_graph(self):
    """(caller → [(callee, factor)], the fused computations, the (caller,
    while instruction) pairs; loops get their edges once counted)."""
    edges: dict[str, list] = {}
    fused: set[str] = set()
    loop_edges = []
    for comp, insts in self.comps.items():
      out_edges = edges.setdefault(comp, [])
      for inst in insts:
        if inst.opcode == "while":
          loop_edges.append((comp, inst))
        elif inst.opcode == "fusion":
          for c in _called(inst.attrs, "calls"):
            out_edges.append((c, 1.0))
            fused.add(c)
        elif inst.opcode == "call" or inst.opcode.endswith("-start"):
          keys = ("calls", "to_apply") if inst.opcode == "call" else ("calls",)
          for key in keys:
            out_edges += [(c, 1.0) for c in _called(inst.attrs, key)]
        elif inst.opcode == "conditional":
          for key in ("branch_computations", "true_computation",
                      "false_computation"):  # fmt: skip
            out_edges += [(c, 1.0) for c in _called(inst.attrs, key)]
    return edges, fused, loop_edges

  def _inside_loops(self, edges, loop_edges) -> set[str]:
    """Computations reachable from some loop body: a data-dependent loop
    there runs once per iteration of the loop around it."""
    inner = lambda c: [
      b for cc, w in loop_edges if cc == c
      for b in _called(w.attrs, "body") + _called(w.attrs, "condition")
    ]  # fmt: skip
    found: set[str] = set()
    todo = [b for _, w in loop_edges for b in _called(w.attrs, "body")]
    while todo:
      c = todo.pop()
      if c not in found and c in self.comps:
        found.add(c)
        todo += [e[0] for e in edges.get(c, [])] + inner(c)
    return found

  def _multiplicities(self, edges):
    """computation → times it runs, summed over callers in topological
    order from the entry (depth-first post-order, reversed)."""
    order, seen = [], {self.entry}
    stack = [(self.entry, iter(edges.get(self.entry, [])))]
    while stack:
      comp, it = stack[-1]
      nxt = next(it, None)
      if nxt is None:
        order.append(comp)
        stack.pop()
      elif nxt[0] in self.comps and nxt[0] not in seen:
        seen.add(nxt[0])
        stack.append((nxt[0], iter(edges.get(nxt[0], []))))
    order.reverse()
    mult = dict.fromkeys(order, 0.0)
    mult[self.entry] = 1.0
    for comp in order:
      for c, factor in edges.get(comp, []):
        if c in mult:
          mult[c] += mult[comp] * factor
    return mult

  def _add(self, out: Cost, comp: str, m: float, traffic: bool):
    """Adds ``m`` runs of computation ``comp`` to ``out`` (its bytes only
    when it is not a fusion's body: those stay on chip)."""
    f = b = 0.0
    for inst in self.comps[comp]:
      f += self._flops(comp, inst)
      if inst.opcode == "custom-call":
        out.custom_calls += 1
        target = call_target(inst)
        if target == "tpu_custom_call":
          out.mosaic_calls += m
          kernel = re.sub(r"\.\d+$", "", inst.name)
          out.mosaic_kernels[kernel] = out.mosaic_kernels.get(kernel, 0) + m
        else:
          t = target or "?"
          out.library_calls[t] = out.library_calls.get(t, 0) + m
      if traffic:
        b += self._bytes(comp, inst)
    out.flops += m * f
    out.bytes_accessed += m * b

  def _flops(self, comp: str, inst: Inst) -> float:
    if inst.opcode == "custom-call":
      return custom_call_flops(inst, self.types[comp])
    if inst.opcode not in ("dot", "convolution"):
      return 0.0
    out = math.prod(shape_of(inst.type))
    types = self.types[comp]
    if inst.opcode == "dot":
      lhs = shape_of(types.get(inst.operands[0], ""))
      dims = _attr(inst.attrs, "lhs_contracting_dims") or "{}"
      idx = [int(x) for x in re.findall(r"\d+", dims)]
      return 2.0 * out * math.prod(lhs[i] for i in idx if i < len(lhs))
    # A convolution: 2 · output elements · input features · the window
    # taps that land on real input. TPU writes batched matmuls as
    # convolutions whose batch dimensions are windows over a dilated or
    # padded input with one real tap per output position.
    labels = _attr(inst.attrs, "dim_labels") or ""
    parts = re.match(r"(\w+)_(\w+)->(\w+)", labels)
    kernel = shape_of(types.get(inst.operands[1], ""))
    lhs = shape_of(types.get(inst.operands[0], ""))
    if not parts or not kernel or len(parts.group(2)) != len(kernel):
      return 0.0
    llab, klab, olab = parts.groups()
    oshape = shape_of(inst.type)
    window = re.search(r"window=\{([^}]*)\}", inst.attrs)
    w = dict(re.findall(r"(\w+)=([\dx_]+)", window.group(1))) if window else {}
    taps = 1.0
    for d, key in enumerate(sorted(c for c in klab if c.isdigit())):
      if key not in llab or key not in olab:
        continue
      taps *= _real_taps(
        lhs[llab.index(key)], oshape[olab.index(key)],
        _nth(w, "size", d, kernel[klab.index(key)]), _nth(w, "stride", d, 1),
        _nth(w, "pad", d, (0, 0)), _nth(w, "lhs_dilate", d, 1),
      )  # fmt: skip
    return 2.0 * out * kernel[klab.index("i")] * taps

  def _bytes(self, comp: str, inst: Inst) -> float:
    op = inst.opcode
    if op in _NO_TRAFFIC or op.endswith("-done"):
      return 0.0
    types = self.types[comp]
    out = type_bytes(inst.type)
    reads = [type_bytes(types.get(o, "")) for o in inst.operands]
    if op in _SLICERS:
      return 2.0 * out + sum(reads[1:])
    if op == "dynamic-update-slice":
      upd = reads[1] if len(reads) > 1 else 0.0
      return 2.0 * upd + sum(reads[2:])
    if op == "fusion":
      called = _called(inst.attrs, "calls")
      body = self.comps.get(called[0], []) if called else []
      return self._fusion_bytes(body, reads, out)
    return out + sum(reads)

  def _fusion_bytes(self, body: list[Inst], reads: list[float], out: float):
    params = {}
    for i in body:
      if i.opcode == "parameter":
        m = re.match(r"\s*(\d+)", i.args)
        if m:
          params[i.name] = int(m.group(1))
    users: dict[str, list[Inst]] = {}
    for i in body:
      for o in i.operands:
        users.setdefault(o, []).append(i)
    root = next((i for i in body if i.root), None)
    total = 0.0
    in_place = None
    if root is not None and root.opcode == "dynamic-update-slice":
      in_place = root.operands[0]
      out = 2.0 * type_bytes(
        next((i.type for i in body if i.name == root.operands[1]), "")
      )
    for name, idx in params.items():
      if idx >= len(reads):
        continue
      if name == in_place:
        continue  # the buffer updated in place is not read whole
      us = users.get(name, [])
      if us and all(u.opcode in _SLICERS and u.operands[0] == name
                    for u in us):  # fmt: skip
        total += sum(type_bytes(u.type) for u in us)
      else:
        total += reads[idx]
    return total + out


def _nth(window: dict, key: str, d: int, default):
  """Dimension d of a window attribute (``size=3x8``, ``pad=0_1x2_2``)."""
  if key not in window:
    return default
  item = window[key].split("x")[d]
  if key == "pad":
    lo, hi = item.split("_")
    return int(lo), int(hi)
  return int(item)


def _real_taps(n_in, n_out, size, stride, pad, dilate) -> float:
  """Mean number of window taps per output position that read a real
  input element (not padding, not a hole of the input's dilation)."""
  if n_out * size > 4_000_000:  # a real spatial convolution: no tricks
    return size / dilate
  span = (n_in - 1) * dilate
  hits = 0
  for o in range(n_out):
    for k in range(size):
      x = o * stride + k - pad[0]
      hits += 0 <= x <= span and x % dilate == 0
  return hits / n_out


def analyze(hlo: str, bounds=None, default_bound=1) -> Cost:
  return Program(hlo).cost(bounds, default_bound)
