"""Attention: the XLA reference and the fused kernels (``model.attention``).

Shape letters as in ``layers.py``: B batch, T queries, S keys, N query
heads, K key/value heads, R = N // K query heads per key head, H head
dim. Queries are [B,T,N,H]; keys and values head-major [B,K,S,H] (the
cache layout).

* ``xla`` (default): scores [B,K,R,T,S] in float32, masked softmax, the
  values; shared prompts merge the prompt part and the row part by their
  log-sum-exps. Runs everywhere; the reference the others are tested
  against.
* ``cudnn``: ``jax.nn.dot_product_attention`` with a boolean mask: cuDNN's
  fused flash attention on a GPU with a bfloat16 / float16 compute dtype
  (cuDNN has no float32 kernel), its XLA implementation elsewhere.
* ``splash``: the Pallas splash-attention kernel (TPU; interpret mode on
  other backends, slow, for tests): causal or full block masks with segment
  ids for padding; lengths are padded to multiples of 128 (the kernel's
  block size) inside.

The fused kernels never materialise the [T, S] scores. Their log-sum-exp
outputs are not differentiable, so on the shared-prompt training path
(``shared_prefix``) they attend over each row's concatenated [prompt | own]
keys (the prompt's keys and values broadcast to its G rows: [B,K,T,H], far
less than the scores) instead of merging two parts; the merge is used where
no gradient is taken (a prefill into a cache that already holds keys).
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from multians_jax import sharding
from multians_jax.model.config import IMPLS

BLOCK = 128  # splash block size; lengths are padded to a multiple of it


def check(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"model.attention must be one of {IMPLS}: {impl!r}")


# ---------------------------------------------------------------------------
# XLA


def dense(q, k, v, allowed, dtype, with_lse: bool = False, key_layout="sh"):
  """q [B,T,N,H], k/v [B,K,S,H], allowed [B,T,S] → [B,T,N,H]; with
  ``key_layout="hs"`` the keys are [B,K,H,S] (a decode cache).

  Both contractions are plain batched matmuls over (B, K). ``with_lse``
  also returns the log-sum-exp of the scaled scores, float32 [B,T,N], so
  that attention over disjoint key sets can be merged exactly (``merge``).
  A query with no allowed key averages every value (finite; callers mask
  such positions out).
  """
  b, t, n, h = q.shape
  kv = k.shape[1]
  r = n // kv
  q = (
    q.reshape(b, t, kv, r, h).transpose(0, 2, 3, 1, 4).reshape(b, kv, r * t, h)
  )
  spec = "bkqh,bkhs->bkqs" if key_layout == "hs" else "bkqh,bksh->bkqs"
  s = jnp.einsum(spec, q, k, preferred_element_type=jnp.float32)
  s = s.reshape(b, kv, r, t, -1) * (h**-0.5)
  s = jnp.where(allowed[:, None, None], s, jnp.finfo(jnp.float32).min)
  if with_lse:
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - m)
    z = jnp.sum(e, axis=-1, keepdims=True)
    p = e / z
    lse = (m + jnp.log(z))[..., 0].transpose(0, 3, 1, 2).reshape(b, t, n)
  else:
    p = jax.nn.softmax(s, axis=-1)
  p = p.astype(dtype).reshape(b, kv, r * t, -1)
  o = jnp.einsum("bkqs,bksh->bkqh", p, v).reshape(b, kv, r, t, h)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return (o, lse) if with_lse else o


def merge(o1, lse1, o2, lse2):
  """Attention over the union of two disjoint key sets from its parts.

  o [B,T,N,H] and lse [B,T,N] of each part: softmax over the union = each
  part's softmax weighted by exp(lseᵢ − lse). A part with no allowed key
  (lse ≈ −∞) gets weight 0 whatever its output holds.
  """
  lse = jnp.logaddexp(lse1, lse2)
  w1 = jnp.exp(lse1 - lse)[..., None]
  w2 = jnp.exp(lse2 - lse)[..., None]
  part = lambda o, w: jnp.where(w > 0, o.astype(jnp.float32) * w, 0.0)
  return (part(o1, w1) + part(o2, w2)).astype(o1.dtype)


# ---------------------------------------------------------------------------
# cuDNN (jax.nn.dot_product_attention)


def _never_empty(allowed):
  """Rows with no allowed key may attend to every key (as ``dense``
  does): a fused kernel's output for an empty row is unspecified."""
  return allowed | ~jnp.any(allowed, axis=-1, keepdims=True)


def dpa(q, k, v, allowed, dtype):
  """``jax.nn.dot_product_attention`` on our layouts: k/v head-major
  [B,K,S,H] → [B,S,K,H]; cuDNN when compiled for GPUs (the target's
  platform, so a GPU compile from a CPU host takes it too) in 16-bit
  dtypes, else XLA."""
  half = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  impl = "cudnn" if _target_platform() == "gpu" and half else "xla"

  def local(q, k, v, allowed):
    c = lambda x: x.astype(dtype)
    return jax.nn.dot_product_attention(
      c(q),
      c(k.transpose(0, 2, 1, 3)),
      c(v.transpose(0, 2, 1, 3)),
      mask=_never_empty(allowed)[:, None],
      implementation=impl,
    )

  return _per_device(local, q, k, v, allowed)


# ---------------------------------------------------------------------------
# Splash (Pallas)


def _round(n: int) -> int:
  return -(-n // BLOCK) * BLOCK


def _block(n: int) -> int:
  """The largest of 512 / 256 / 128 that divides n (a multiple of 128)."""
  return next(b for b in (512, 256, 128) if n % b == 0)


@functools.lru_cache(maxsize=64)
def _kernel(kind: str, r: int, tq: int, sk: int, prefix: int, lse: bool,
            interpret: bool):  # fmt: skip
  """An MQA splash kernel over r query heads sharing one key head.

  kind: ``causal`` (query i sees keys ≤ i; tq = sk), ``full``, or
  ``prefix`` (keys < prefix, then causal from key ``prefix`` on: rows
  after a shared prompt). ``interpret``: Pallas interpret mode (plain XLA
  ops, for targets other than TPU)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  # Cached: no tracers inside. The mask tables are concrete arrays made on
  # the host's CPU (they become constants of the compiled program), so a
  # compile for other devices (TPU from a CPU host) never runs them there.
  with jax.ensure_compile_time_eval(), _on_host():
    return _make_kernel(sa, kind, r, tq, sk, prefix, lse, interpret)


@contextlib.contextmanager
def _on_host():
  """Concrete arrays made inside go to the host's CPU, whatever mesh is
  active (``jax.set_mesh`` would place them on the mesh's devices, which
  for compile-only TPU devices cannot hold data)."""
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:  # no CPU backend: leave placement as it is
    yield
    return
  try:  # no public API clears the concrete mesh inside a trace (jax 0.10)
    from jax._src import mesh as mesh_src
    from jax._src import sharding_impls

    no_mesh = sharding_impls._internal_use_concrete_mesh(
      mesh_src.empty_concrete_mesh
    )
  except (ImportError, AttributeError):
    no_mesh = contextlib.nullcontext()
  with no_mesh, jax.default_device(cpu):
    yield


def _make_kernel(sa, kind, r, tq, sk, prefix, lse, interpret):
  if kind == "causal":
    mask = sa.CausalMask((tq, sk))
  elif kind == "full":
    mask = sa.FullMask((tq, sk))
  else:
    i = np.arange(tq)[:, None]
    j = np.arange(sk)[None, :]
    mask = sa.NumpyMask((j < prefix) | ((j >= prefix) & (j - prefix <= i)))
  bq, bk = _block(tq), _block(sk)
  sizes = sa.BlockSizes(
    block_q=bq, block_kv=bk, block_kv_compute=bk,
    block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
    block_q_dq=bq, block_kv_dq=bk,
  )  # fmt: skip
  return sa.make_splash_mqa_single_device(
    sa.MultiHeadMask([mask] * r),
    block_sizes=sizes,
    save_residuals=lse,
    interpret=interpret,
  )


def _target_platform() -> str:
  """The platform the computation being traced is compiled for: the active
  mesh's devices (compile-only TPU devices on a CPU host included), else
  the default backend."""
  state = sharding.active()
  if state is not None:
    return state[0].devices.flat[0].platform
  return jax.default_backend()


def splash(q, k, v, q_seg, kv_seg, dtype, kind="causal", prefix=0, lse=False):
  """Splash attention: query t sees key s iff the mask ``kind`` allows
  (t, s) and q_seg[t] == kv_seg[s] (int [B,T] / [B,S]: 1 real, 0 padding).

  Returns [B,T,N,H] (and the float32 lse [B,T,N] with ``lse``).

  A Mosaic kernel cannot be partitioned by the compiler: under a mesh it
  runs per device (``_per_device``).
  """
  interpret = _target_platform() != "tpu"
  local = functools.partial(
    _splash_local, dtype=dtype, kind=kind, prefix=prefix, lse=lse,
    interpret=interpret,
  )  # fmt: skip
  return _per_device(local, q, k, v, q_seg, kv_seg, lse=lse)


def _per_device(fn, q, k, v, *rows_only, lse=False):
  """``fn(q, k, v, *rows_only)`` on each device's rows and heads.

  A fused kernel cannot be partitioned by the compiler as it partitions
  plain ops (a Mosaic kernel not at all; cuDNN's partitioner asks for one
  sharding of queries, keys and values, which a decode step's query and
  its cache do not have): under an active mesh of more than one device it
  runs inside ``shard_map``, each device on its rows (the batch axes) and
  its key/value heads (``tensor``, when it divides the key/value heads: a
  query head must sit with its key head), the layout the activations
  already have. ``rows_only``: per-row arrays ([B, ...]); with ``lse``
  ``fn`` also returns a [B,T,N] log-sum-exp.
  """
  state = sharding.active()
  if state is None or state[0].size == 1:
    return fn(q, k, v, *rows_only)
  mesh, rules = state
  b, kvh = q.shape[0], k.shape[1]
  (rows,) = sharding.spec_for(("batch",), (b,), mesh, rules)
  (heads,) = sharding.spec_for(("act_kv_heads",), (kvh,), mesh, rules)
  if heads is not None and q.shape[2] % math.prod(
    mesh.shape[a] for a in ((heads,) if isinstance(heads, str) else heads)
  ):  # fmt: skip
    heads = None
  P = jax.sharding.PartitionSpec
  qspec, kspec = P(rows, None, heads, None), P(rows, heads)
  out_specs = (qspec, P(rows, None, heads)) if lse else qspec
  return jax.shard_map(
    fn,
    mesh=mesh,
    in_specs=(qspec, kspec, kspec) + (P(rows),) * len(rows_only),
    out_specs=out_specs,
    check_vma=False,
  )(q, k, v, *rows_only)


def _splash_local(q, k, v, q_seg, kv_seg, *, dtype, kind, prefix, lse,
                  interpret):  # fmt: skip
  """``splash`` on one device's rows and heads."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  b, t, n, h = q.shape
  kvh, s = k.shape[1], k.shape[2]
  r = n // kvh
  tq, sk = _round(t), _round(s)
  if kind == "causal":
    tq = sk = max(tq, sk)

  def pad(x, m, axis):
    return jnp.pad(x, [(0, m if a == axis else 0) for a in range(x.ndim)])

  # Added query rows and key slots get segment −1: they see only each other.
  q_seg = jnp.pad(q_seg.astype(jnp.int32), ((0, 0), (0, tq - t)),
                  constant_values=-1)  # fmt: skip
  kv_seg = jnp.pad(kv_seg.astype(jnp.int32), ((0, 0), (0, sk - s)),
                   constant_values=-1)  # fmt: skip
  qh = (q.astype(dtype) * jnp.asarray(h**-0.5, dtype)).reshape(b, t, kvh, r, h)
  qh = pad(qh.transpose(0, 2, 3, 1, 4), tq - t, 3)  # [B,K,R,Tq,H]
  kh = pad(k.astype(dtype), sk - s, 2)
  vh = pad(v.astype(dtype), sk - s, 2)
  kern = _kernel(kind, r, tq, sk, prefix, lse, interpret)

  def one(qi, ki, vi, qs, ks):
    return kern(qi, ki, vi, sa.SegmentIds(q=qs, kv=ks))

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None, None))
  out = jax.vmap(per_head)(qh, kh, vh, q_seg, kv_seg)
  o = out[0] if lse else out
  o = o[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  if not lse:
    return o
  res = out[1][0][:, :, :, :t].transpose(0, 3, 1, 2).reshape(b, t, n)
  return o, res.astype(jnp.float32)


# ---------------------------------------------------------------------------
# The call sites (layers.layer_fn, layers.shared_layer_fn)


def self_attention(impl, q, k, v, allowed, mask, dtype):
  """Causal attention over the T tokens of this call (no cache):
  allowed [B,T,T] = mask [B,T] keys ∧ causal."""
  if impl == "xla":
    return dense(q, k, v, allowed, dtype)
  if impl == "cudnn":
    return dpa(q, k, v, allowed, dtype)
  return splash(q, k, v, mask, mask, dtype)


def decode_key_layout(impl: str) -> str:
  """How the sampler's decode cache stores keys for ``impl``: ``"hs"``
  ([B,K,H,S]) for ``xla`` and ``cudnn``, whose decode steps run ``dense``
  (``cached_attention``): q·kᵀ is then a plain matmul (as stored [B,K,S,H]
  it contracts both operands' minor dimension: 2–8× slower on XLA:CPU at
  SmolLM2's decode shape, depending on the machine; see BENCHMARKS.md).
  ``"sh"`` for splash, TPU-only, whose refill prefills read the cache as
  the kernel's [S, H] keys without a copy (a TPU contracts either way)."""
  check(impl)
  return "sh" if impl == "splash" else "hs"


def cached_attention(impl, q, k, v, allowed, dtype, prefill=None,
                     key_layout="sh"):  # fmt: skip
  """Attention over a cache the T new keys were just written to (k/v
  [B,K,S,H], the keys [B,K,H,S] with ``key_layout="hs"``; allowed
  [B,T,S]). A decode step (T = 1) attends to the slots ``allowed`` names.
  Splash prefills (T > 1) need the structure instead: ``prefill`` = (k, v,
  mask [B,S]) of the cache before the write and (k, v, mask [B,T]) of the
  new tokens, merged as two parts (cached keys all precede the new ones).

  A decode step (T = 1) runs ``dense`` under every backend: one query row
  has no scores to save, cuDNN's kernel wants the keys as [B,S,K,H] (a
  transposed copy of the whole cache per step: +20 % of an H100 decode
  step's bytes) and splash pads the one query to a 128-row block (20× the
  step's FLOPs at the paper shape on v5p, compute-bound). Splash's cache
  keeps its [B,K,S,H] keys, which ``dense`` reads in place."""
  if impl == "xla" or q.shape[1] == 1:
    return dense(q, k, v, allowed, dtype, key_layout=key_layout)
  if key_layout != "sh":
    k = k.swapaxes(2, 3)  # not the fused kernels' decode layout: a copy
    if prefill is not None:
      (ko, vo, om), new = prefill
      prefill = ((ko.swapaxes(2, 3), vo, om), new)
  if impl == "cudnn":
    return dpa(q, k, v, allowed, dtype)
  ones = jnp.ones(q.shape[:2], jnp.int32)
  (ko, vo, old_mask), (kn, vn, mask) = prefill
  o1, l1 = splash(q, ko, vo, ones, old_mask, dtype, kind="full", lse=True)
  o2, l2 = splash(q, kn, vn, mask, mask, dtype, lse=True)
  return merge(o1, l1, o2, l2)


def _prefix_part(q, kp, vp, prefix_mask, dtype):
  """``dense`` of grouped rows over their prefix, with the log-sum-exp.

  q [B,L,N,H] (rows prefix-major, s = B / P per prefix), kp/vp [P,K,T,H],
  prefix_mask [P,T] → o [B,L,N,H], lse [B,L,N]. The rows of a group stay
  their own dimension (s), so the batch sharding of the rows carries over
  to the scores: folding them into the query axis of one prefix would leave
  a micro-batch of one prompt unshardable, and every device would compute
  the whole group's attention (seen in the TPU compile, tools/aot.py).
  """
  b, n_q, n, h = q.shape
  p, kv, t, _ = kp.shape
  s, r = b // p, n // kv
  q6 = q.reshape(p, s, n_q, kv, r, h)
  sc = jnp.einsum("pslkrh,pkth->pskrlt", q6, kp,
                  preferred_element_type=jnp.float32)  # fmt: skip
  sc = sc * (h**-0.5)
  allowed = prefix_mask[:, None, None, None, None, :]
  sc = jnp.where(allowed, sc, jnp.finfo(jnp.float32).min)
  m = jax.lax.stop_gradient(jnp.max(sc, axis=-1, keepdims=True))
  e = jnp.exp(sc - m)
  z = jnp.sum(e, axis=-1, keepdims=True)
  probs = (e / z).astype(dtype)
  lse = (m + jnp.log(z))[..., 0]  # [p, s, k, r, l]
  lse = lse.transpose(0, 1, 4, 2, 3).reshape(b, n_q, n)
  o = jnp.einsum("pskrlt,pkth->pslkrh", probs, vp)
  return o.reshape(b, n_q, n, h), lse


def shared_prefix(impl, q, kp, vp, prefix_mask, k, v, allowed, mask, dtype):
  """Attention of grouped rows over a shared prefix and their own tokens.

  q [B,L,N,H], own k/v [B,K,L,H], allowed [B,L,L] (causal and padding
  within the row), mask [B,L]; prefix k/v [P,K,T,H] with prefix_mask
  [P,T], rows prefix-major (rows i·s … i·s + s − 1 continue prefix i). The
  same as attention over each row's concatenated [prefix | row] sequence.
  """
  b, n_q, n, h = q.shape
  p, t = kp.shape[0], kp.shape[2]
  s = b // p
  if impl == "xla":  # two parts, merged: the prefix's keys once per group
    o1, lse1 = _prefix_part(q, kp, vp, prefix_mask, dtype)
    o2, lse2 = dense(q, k, v, allowed, dtype, with_lse=True)
    return merge(o1, lse1, o2, lse2)
  rep = lambda x: jnp.repeat(x, s, axis=0)
  kc = jnp.concatenate([rep(kp), k], axis=2)  # [B,K,T+L,H]
  vc = jnp.concatenate([rep(vp), v], axis=2)
  pm = rep(prefix_mask)
  if impl == "cudnn":
    pre = jnp.broadcast_to(pm[:, None, :], (b, n_q, t))
    return dpa(q, kc, vc, jnp.concatenate([pre, allowed], -1), dtype)
  # Splash: the prefix padded to a block, so the mask is static.
  tp = _round(t)
  kc = jnp.pad(kc, ((0, 0), (0, 0), (tp - t, 0), (0, 0)))
  vc = jnp.pad(vc, ((0, 0), (0, 0), (tp - t, 0), (0, 0)))
  kv_seg = jnp.concatenate([jnp.pad(pm, ((0, 0), (tp - t, 0))), mask], -1)
  return splash(q, kc, vc, mask, kv_seg, dtype, kind="prefix", prefix=tp)
