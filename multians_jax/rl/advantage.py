"""Group-relative advantages (METHOD §5): pure functions of reward arrays.

Shape letters: P prompts, G generations per prompt (one group each).

Every kind subtracts a baseline built from the group, so the G completions
of a prompt are compared only with each other:

- ``drgrpo``: A_i = r_i − mean_j r_j (Dr.GRPO; the reference default).
- ``grpo``: A_i = (r_i − mean_j r_j) / (std_j r_j + 1e-6) (original GRPO).
  The std is the *unbiased* one (``ddof=1``) by default, as
  ``torch.Tensor.std`` in the reference GRPO trainer; ``ddof=0`` is the
  population std.
- ``rloo``: A_i = r_i − mean_{j≠i} r_j = G/(G−1) · (r_i − mean_j r_j)
  (REINFORCE leave-one-out). Needs G ≥ 2.
- ``gdpo``: each reward component normalised in its group as ``grpo``,
  summed with weights, the sum divided by its batch std
  (``gdpo_advantages``; the components come from ``credit``).
- ``passk``: PKPO (Walder & Karkhanis, arXiv 2505.15201), the policy
  gradient of maxg@k = E[max of k samples' rewards] (pass@k for 0/1
  rewards) instead of the mean reward (``passk_advantages``).

A group whose rewards are all equal carries no learning signal: its
advantages are set to exactly zero (not merely rounded near zero, which the
``grpo`` division by ~1e-6 would blow up) and its share is reported as
``zero_std_frac``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from multians_jax import settings

# This module's settings (defined in the leaf settings.py).
ADVANTAGES = settings.ADVANTAGES
BASELINES = settings.BASELINES
KINDS = settings.KINDS

STD_EPS = 1e-6


def advantages(
  rewards: jax.Array, kind: str, *, std_ddof: int = 1
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-completion advantages from per-completion rewards.

  Args:
    rewards: float [P, G], row p holding the G rewards of prompt p.
    kind: ``drgrpo`` | ``grpo`` | ``rloo`` (see the module docstring).
    std_ddof: delta degrees of freedom of the ``grpo`` group std (1 =
      unbiased, as the reference; 0 = population std).

  Returns:
    ``(adv, info)``: adv float32 [P, G]; info holds scalars
    ``zero_std_frac`` (fraction of groups with equal rewards, which get
    A = 0), ``reward_mean`` and ``group_std_mean`` (mean within-group
    population std).

  Raises:
    ValueError: unknown ``kind``, ``rewards`` not 2-D, ``rloo`` with G = 1,
      or ``std_ddof`` outside {0, 1}.
  """
  if kind not in KINDS:
    hint = " (gdpo reads components: gdpo_advantages)" if kind == "gdpo" else ""
    raise ValueError(f"rl.advantage must be one of {KINDS}: {kind!r}{hint}")
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [P, G], got shape {rewards.shape}")
  if std_ddof not in (0, 1):
    raise ValueError(f"std_ddof must be 0 or 1: {std_ddof}")
  g = rewards.shape[1]
  if kind == "rloo" and g < 2:
    raise ValueError(
      "rl.advantage='rloo' needs at least 2 generations per prompt "
      f"(leave-one-out mean of G-1 others), got G={g}"
    )
  r = rewards.astype(jnp.float32)
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  if kind == "drgrpo":
    adv = centred
  elif kind == "rloo":
    adv = centred * (g / (g - 1))
  else:
    adv = centred / (_group_std(centred, std_ddof) + STD_EPS)
  flat = _flat_groups(r)
  adv = jnp.where(flat[:, None], 0.0, adv)
  return adv, _group_info(r, flat)


def _group_info(r: jax.Array, flat: jax.Array) -> dict[str, jax.Array]:
  """The scalars every kind reports: ``zero_std_frac`` (share of flat
  groups), ``reward_mean`` and ``group_std_mean`` (population std)."""
  centred = r - jnp.mean(r, axis=1, keepdims=True)
  return {
    "zero_std_frac": jnp.mean(flat.astype(jnp.float32)),
    "reward_mean": jnp.mean(r),
    "group_std_mean": jnp.mean(_group_std(centred, 0)),
  }


def passk_advantages(rewards: jax.Array, k: int):
  """PKPO's advantages: an unbiased policy gradient of maxg@k.

  For a group of n = G rewards, Σ_i s_i ∇log π(x_i) with s_i the average
  over the C(n, k) subsets I ∋ i of max_I g − max_{I∖i} g (the paper's
  s^(loo−1): the k − 1 others' max is the baseline; it does not depend
  on x_i, so the estimate stays unbiased). With the rewards sorted
  ascending (ties by index), sample of rank r (1-based) gets

    s_r = Σ_{j<r} C(j−1, k−2) (g_(r) − g_(j)) / C(n, k)

  (a subset's max is g_(r) when its other k − 1 members rank below r:
  C(r−1, k−1) = Σ_{j<r} C(j−1, k−2) subsets; otherwise i is not the max
  and both maxima are equal). So s ≥ 0: the best samples of a group are
  pushed up, the rest get nothing. For 0/1 rewards with c correct, a
  correct sample gets C(n−c, k−1) / C(n, k), a wrong one 0. The
  advantage is n · s_i, so the loss's mean over a group's rows is the
  estimate (k = 1 would be plain REINFORCE: k ≥ 2).

  Args:
    rewards: float [P, G]. k: 2 ≤ k ≤ G.

  Returns:
    (adv float32 [P, G], info): info as ``advantages``'s, plus
    ``passk_estimate``, the mean unbiased estimate of maxg@k,
    Σ_r C(r−1, k−1) g_(r) / C(n, k).
  """
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [P, G], got shape {rewards.shape}")
  n = rewards.shape[1]
  if not 2 <= k <= n:
    raise ValueError(
      f"rl.pass_k must lie in [2, num_generations={n}] for "
      f"rl.advantage='passk': {k}"
    )
  total = math.comb(n, k)
  w = jnp.asarray([math.comb(j, k - 2) / total for j in range(n)], "f4")
  a = jnp.asarray([math.comb(j, k - 1) / total for j in range(n)], "f4")
  r = rewards.astype(jnp.float32)
  order = jnp.argsort(r, axis=1, stable=True)
  g = jnp.take_along_axis(r, order, axis=1)  # ascending
  below = jnp.cumsum(w * g, axis=1) - w * g  # Σ_{j<r} w_j g_(j)
  s = a * g - below
  adv = jnp.zeros_like(s).at[jnp.arange(r.shape[0])[:, None], order].set(s)
  flat = _flat_groups(r)  # exactly 0, not the sums' rounding
  adv = jnp.where(flat[:, None], 0.0, adv)
  info = _group_info(r, flat)
  info["passk_estimate"] = jnp.mean(jnp.sum(a * g, axis=1))
  return adv * n, info


def _group_std(centred: jax.Array, ddof: int) -> jax.Array:
  """Std per group [P, 1] from centred rewards; 0 where G − ddof ≤ 0."""
  dof = centred.shape[1] - ddof
  if dof <= 0:
    return jnp.zeros((centred.shape[0], 1), centred.dtype)
  return jnp.sqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / dof)


def _flat_groups(r: jax.Array) -> jax.Array:
  """bool [P]: every reward of the group is equal (zero variance)."""
  return jnp.max(r, axis=1) == jnp.min(r, axis=1)


def slot_advantages(
  slot: jax.Array,
  kind: str,
  *,
  baseline: str = "slot",
  std_ddof: int = 1,
) -> jax.Array:
  """Per-answer advantages from each slot's part of the reward (METHOD §10).

  Slot i of completion g gets s_gi minus a baseline from its group:

  - ``baseline='slot'``: the same slot's mean, m_i = mean_g s_gi (the
    ``advantages`` of column i: ``kind`` scales and zeroes as there);
  - ``baseline='pooled'``: every slot's mean, m = mean_{g, j} s_gj, with
    ``rloo`` scaling by c/(c−1) and ``grpo`` dividing by the std of the
    c = G·A values; a group whose G·A values are all equal gets 0.

  Args:
    slot: float [P, G, A], ``reward.set_reward_kernel``'s ``slot``.
    kind: ``drgrpo`` | ``grpo`` | ``rloo``.
    baseline: ``slot`` | ``pooled``.
    std_ddof: as in ``advantages``.

  Returns:
    float32 [P, G, A].
  """
  if baseline not in BASELINES:
    raise ValueError(
      f"rl.credit_baseline must be one of {BASELINES}: {baseline!r}"
    )
  if slot.ndim != 3:
    raise ValueError(f"slot must be [P, G, A], got shape {slot.shape}")
  p, g, a = slot.shape
  if baseline == "slot":
    cols = jnp.moveaxis(slot, 2, 1).reshape(p * a, g)
    adv, _ = advantages(cols, kind, std_ddof=std_ddof)
    return jnp.moveaxis(adv.reshape(p, a, g), 1, 2)
  adv, _ = advantages(slot.reshape(p, g * a), kind, std_ddof=std_ddof)
  return adv.reshape(p, g, a)


def gdpo_advantages(
  components: jax.Array, weights, *, std_ddof: int = 1
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GDPO: each reward component normalised in its group, then summed.

  With c_gk the value of component k for completion g of a group,

    A_g = Σ_k w_k (c_gk − mean_g c_gk) / (std_g c_gk + 1e-6),

  a component that is equal across the group contributing exactly 0 (as
  in ``grpo``); then A is divided by its std over the whole batch (+1e-6).
  Its batch mean is zero by construction (every term has zero group mean),
  so only the scale is normalised and flat groups keep A = 0. Normalising
  each component separately keeps a component with a small spread (e.g.
  the Brier term next to a 0/1 correctness) from being drowned by the
  others, which a normalised sum would do.

  Args:
    components: float [P, G, C], the C reward components of each completion.
    weights: C weights w_k.
    std_ddof: delta degrees of freedom of the group std (as ``grpo``).

  Returns:
    ``(adv, info)``: adv float32 [P, G]; info as ``advantages`` (its
    ``zero_std_frac`` counts groups where every component is flat) plus
    ``gdpo/batch_std``.
  """
  if components.ndim != 3:
    raise ValueError(
      f"components must be [P, G, C], got shape {components.shape}"
    )
  w = jnp.asarray(weights, jnp.float32)
  if w.shape != components.shape[2:]:
    raise ValueError(
      f"{components.shape[2]} reward components but {w.shape} weights"
    )
  p, g, c = components.shape
  cols = jnp.moveaxis(components.astype(jnp.float32), 2, 1).reshape(p * c, g)
  per, _ = advantages(cols, "grpo", std_ddof=std_ddof)
  summed = jnp.einsum("pcg,c->pg", per.reshape(p, c, g), w)
  batch_std = jnp.std(summed)
  adv = summed / (batch_std + STD_EPS)
  flat = jnp.all(_flat_groups(cols).reshape(p, c), axis=1)
  total = jnp.einsum("pgc,c->pg", components.astype(jnp.float32), w)
  info = {
    "zero_std_frac": jnp.mean(flat.astype(jnp.float32)),
    "reward_mean": jnp.mean(total),
    "group_std_mean": jnp.mean(
      _group_std(total - jnp.mean(total, 1, keepdims=True), 0)
    ),
    "gdpo/batch_std": batch_std,
  }
  return adv, info
