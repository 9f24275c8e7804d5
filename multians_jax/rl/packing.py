"""Packed completions: a group's G completions in one row of the update.

``microbatch.pack`` plans it on the host: per micro-batch of n groups a
row of ``width`` columns per group, ``src`` [n, width] naming the batch's
completion token in each column and ``dst`` [n · G, L] the column of each
row's token. Here, inside the jitted update, the packed rows are gathered
from the batch (their prompts once in front of them, their positions the
rows' own, a segment id per completion) and the packed log-probs are put
back in the batch's [rows, L] layout, where every loss term is computed as
on unpacked rows. A token attends to its prompt and to the earlier tokens
of its own completion only (``model.Transformer.hidden_shared`` with
``segments``), so its log-prob is the unpacked one's up to float rounding.
"""

from __future__ import annotations

import jax.numpy as jnp

from multians_jax import sharding
from multians_jax.rl import loss


def packed_rows(tokens, positions, mask, width_l: int, src):
  """The packed [n, width] tokens, positions, mask and segments of the
  batch's [B, T + L] rows (the completions their last ``width_l``
  columns). Empty columns (src -1): token 0, masked, segment -1."""
  t = tokens.shape[1] - width_l
  have = src >= 0
  at = jnp.maximum(src, 0)
  comp = lambda x: x[:, t:].reshape(-1)[at]
  rows = lambda x: sharding.constrain(x, ("batch", None))
  return (
    rows(jnp.where(have, comp(tokens), 0)),
    rows(jnp.where(have, comp(positions), 0)),
    rows(have & comp(mask)),
    rows(jnp.where(have, src // width_l, -1)),
  )


def prompts(tokens, positions, mask, width_l: int, rows, group: int):
  """[n, T] prompt tokens, positions and mask of the micro-batch's groups
  (the first row of each; a padding group's is row 0's)."""
  t = tokens.shape[1] - width_l
  first = jnp.maximum(rows.reshape(-1, group)[:, 0], 0)
  take = lambda x: sharding.constrain(x[first, :t], ("batch", None))
  return take(tokens), take(positions), take(mask)


def unpack(x, dst):
  """Packed [n, width] values → the rows' [n · G, L] (0 where dst is -1)."""
  flat = x.reshape(-1)
  out = jnp.where(dst >= 0, flat[jnp.maximum(dst, 0)], 0.0)
  return sharding.constrain(out, ("batch", None))


def logprobs(model, tokens, positions, mask, rows, src, dst, cfg):
  """(log-probs, entropies) [n · G, L] of the micro-batch's rows ``rows``
  computed on their packed form; ``cfg`` an ``update.UpdateConfig``."""
  width_l = dst.shape[1]
  pre = prompts(tokens, positions, mask, width_l, rows, cfg.group_size)
  ptok, ppos, pmask, seg = packed_rows(tokens, positions, mask, width_l, src)
  logp, ent = loss.shared_prompt_logprobs(
    model, *pre, ptok, ppos, pmask,
    temperature=cfg.temperature, chunk=cfg.logprob_chunk,
    return_entropy=True, support=cfg.support, segments=seg,
  )  # fmt: skip
  return unpack(logp, dst), unpack(ent, dst)
