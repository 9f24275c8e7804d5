"""Clipped PG loss, aggregations and chunked token log-probs.

Hand-computed numbers for every option; micro-batch exactness of values and
gradients; chunked log-probs against a full-logits oracle; no [B, T, V]
intermediate in the jaxpr (forward and backward).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from multians_jax import sharding
from multians_jax.model import support as support_lib
from multians_jax.model import transformer as model
from multians_jax.rl import loss

AGGS = loss.LOSS_AGGS
L = np.log


def pg_loss(logp, old_logp, adv, mask, cfg, *, ref_logp=None, truncated=None):
  """The loss of one whole batch, as the update step assembles it:
  ``pg_loss_terms`` / ``loss_denominator``, with reduced metrics."""
  num, sums = loss.pg_loss_terms(
    logp, old_logp, adv, mask, cfg, ref_logp=ref_logp, truncated=truncated
  )
  den = loss.loss_denominator(mask, cfg, truncated)
  return num / den, loss.reduce_metrics(sums)


def cfg_for(agg="token_mean", **kw):
  if agg == "seq_mean_token_sum_norm":
    kw.setdefault("max_len_norm", 4)
  return loss.LossConfig(loss_agg=agg, **kw)


# ---------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
  "kw, field",
  [
    ({"clip_eps_low": -0.1}, "loss.clip_eps_low"),
    ({"clip_eps_low": 1.0}, "loss.clip_eps_low"),
    ({"clip_eps_high": -0.5}, "loss.clip_eps_high"),
    ({"loss_agg": "dapo"}, "loss.agg must be one of"),
    ({"loss_agg": "seq_mean_token_sum_norm"}, "max_len_norm"),
    (
      {"loss_agg": "seq_mean_token_sum_norm", "max_len_norm": 0},
      "max_len_norm",
    ),
    ({"kl_beta": -1.0}, "loss.kl_beta"),
    ({"kl_beta": float("nan")}, "loss.kl_beta"),
    ({"mask_truncated": 1}, "loss.mask_truncated"),
    ({"kind": "grpo"}, "loss.kind must be one of"),
    ({"kind": "gspo"}, "loss.agg='seq_mean_token_mean'"),
    (
      {"kind": "gspo", "loss_agg": "seq_mean_token_sum_norm"},
      "loss.kind='gspo'",
    ),
    ({"gspo_clip_high": 1.5}, "loss.gspo_clip_high"),
  ],
)
def test_config_errors_name_the_field(kw, field):
  with pytest.raises(ValueError, match=field):
    loss.LossConfig(**kw)


def test_config_defaults_and_hashable():
  c = loss.LossConfig()
  assert (c.clip_eps_low, c.clip_eps_high, c.loss_agg) == (
    0.2,
    0.2,
    "token_mean",
  )
  assert (c.kl_beta, c.mask_truncated) == (0.0, False)
  assert hash(c) == hash(loss.LossConfig())


# ---------------------------------------------------------------------------
# Per-token clipped loss: ρ below / inside / above the clip range, A ± .

RHO = np.array([0.5, 1.0, 1.5])
ADV = np.array([1.0, -2.0])


def test_per_token_clip_table_symmetric():
  logp = jnp.asarray(np.tile(L(RHO), (2, 1)), jnp.float32)
  out = loss.per_token_loss(
    logp, jnp.zeros_like(logp), jnp.asarray(ADV), cfg_for()
  )
  # A=+1: -min(ρ, clip(ρ)) = -0.5 (not clipped), -1, -min(1.5, 1.2) = -1.2.
  # A=-2: -min(-1, -1.6) = 1.6 (clipped low), 2, -min(-3, -2.4) = 3.
  np.testing.assert_allclose(
    out, [[-0.5, -1.0, -1.2], [1.6, 2.0, 3.0]], rtol=1e-6
  )


def test_per_token_clip_table_asymmetric():
  logp = jnp.asarray(np.tile(L(RHO), (2, 1)), jnp.float32)
  cfg = cfg_for(clip_eps_low=0.1, clip_eps_high=0.28)
  out = loss.per_token_loss(logp, jnp.zeros_like(logp), jnp.asarray(ADV), cfg)
  # A=+1, ρ=1.5: clipped to 1.28. A=-2, ρ=0.5: clipped to 0.9 → 1.8.
  np.testing.assert_allclose(
    out, [[-0.5, -1.0, -1.28], [1.8, 2.0, 3.0]], rtol=1e-6
  )


def test_clip_metrics_and_token_mean():
  logp = jnp.asarray(np.tile(L(RHO), (2, 1)), jnp.float32)
  mask = jnp.ones((2, 3), bool)
  value, m = pg_loss(
    logp, jnp.zeros_like(logp), jnp.asarray(ADV), mask, cfg_for()
  )
  assert float(value) == pytest.approx((-0.5 - 1 - 1.2 + 1.6 + 2 + 3) / 6)
  assert float(m["clip_low_frac"]) == pytest.approx(1 / 6)  # ρ=.5, A<0
  assert float(m["clip_high_frac"]) == pytest.approx(1 / 6)  # ρ=1.5, A>0
  assert float(m["clip_frac"]) == pytest.approx(2 / 6)
  assert float(m["ratio_mean"]) == pytest.approx(1.0)
  assert float(m["tokens"]) == 6
  assert "kl_mean" not in m


# ---------------------------------------------------------------------------
# Aggregations on a ragged batch.
# Row 0 (A=+1): ρ = .5, 1, 1.5, [1]  → ℓ = -.5, -1, -1.2  (3 tokens)
# Row 1 (A=-2): ρ = .5, 1.5, [1, 1] → ℓ = 1.6, 3          (2 tokens)

RAGGED_RHO = np.array([[0.5, 1.0, 1.5, 1.0], [0.5, 1.5, 1.0, 1.0]])
RAGGED_MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
AGG_EXPECTED = {
  "token_mean": (-2.7 + 4.6) / 5,
  "seq_mean_token_mean": (-2.7 / 3 + 4.6 / 2) / 2,
  "seq_mean_token_sum_norm": (-2.7 / 4 + 4.6 / 4) / 2,  # max_len_norm = 4
}
AGG_DEN = {
  "token_mean": 5,
  "seq_mean_token_mean": 2,
  "seq_mean_token_sum_norm": 2,
}


def _ragged_args():
  """(logp, old_logp, adv, mask) of the ragged batch (π_old's log-probs 0)."""
  logp = jnp.asarray(L(RAGGED_RHO), jnp.float32)
  return logp, jnp.zeros_like(logp), jnp.asarray(ADV), jnp.asarray(RAGGED_MASK)


@pytest.mark.parametrize("agg", AGGS)
def test_aggregation_hand_computed(agg):
  args = _ragged_args()
  value, _ = pg_loss(*args, cfg_for(agg))
  assert float(value) == pytest.approx(AGG_EXPECTED[agg], rel=1e-6)
  den = loss.loss_denominator(jnp.asarray(RAGGED_MASK), cfg_for(agg))
  assert float(den) == AGG_DEN[agg]


@pytest.mark.parametrize("agg", AGGS)
def test_entropy_bonus_hand_computed(agg):
  """−β_H·H_t joins each counted token's loss, aggregated as the loss is:
  entropies 1 on row 0's tokens, 2 on row 1's, β_H = 0.1 → each counted
  token's loss falls by 0.1 and 0.2 (the masked one not at all)."""
  args = _ragged_args()
  ent = jnp.asarray([[1.0] * 4, [2.0] * 4])
  cfg = cfg_for(agg, entropy_coef=0.1)
  den = loss.loss_denominator(jnp.asarray(RAGGED_MASK), cfg)
  num, _ = loss.pg_loss_terms(*args, cfg, entropy=ent, entropy_coef=0.1)
  bonus = {  # Σ over counted tokens, per the aggregation
    "token_mean": 0.1 * 3 + 0.2 * 2,
    "seq_mean_token_mean": 0.1 + 0.2,
    "seq_mean_token_sum_norm": (0.1 * 3 + 0.2 * 2) / 4,
  }[agg]
  assert float(num / den) == pytest.approx(
    AGG_EXPECTED[agg] - bonus / AGG_DEN[agg], rel=1e-6
  )
  # Off (β_H = 0 in the config) the entropies change nothing.
  off, _ = loss.pg_loss_terms(*args, cfg_for(agg), entropy=ent, entropy_coef=1)
  assert float(off / den) == pytest.approx(AGG_EXPECTED[agg], rel=1e-6)


def test_entropy_coef_decays_linearly():
  cfg = cfg_for(entropy_coef=0.2, entropy_decay_steps=100)
  got = [float(loss.entropy_coef(cfg, s)) for s in (0, 25, 100, 500)]
  assert got == pytest.approx([0.2, 0.15, 0.0, 0.0])
  assert float(loss.entropy_coef(cfg_for(entropy_coef=0.2), 10**6)) == (
    pytest.approx(0.2)
  )
  with pytest.raises(ValueError, match="entropy_coef"):
    cfg_for(entropy_coef=-1.0)


def test_sum_norm_uses_the_constant():
  args = _ragged_args()
  cfg = cfg_for("seq_mean_token_sum_norm", max_len_norm=10)
  value, _ = pg_loss(*args, cfg)
  assert float(value) == pytest.approx(1.9 / 10 / 2, rel=1e-6)


# ---------------------------------------------------------------------------
# KL (k3) and truncation masking.


def test_k3_values_and_penalty():
  d = np.array([[L(2.0), -1.0, 0.0]])  # ref - logp
  k3 = [2 - L(2.0) - 1, math.exp(-1) + 1 - 1, 0.0]  # .306853, .367879, 0
  np.testing.assert_allclose(
    loss.k3_kl(jnp.asarray(d), jnp.zeros((1, 3))), [k3], rtol=1e-6
  )
  logp = jnp.asarray([[-1.0, -2.0, -0.5]])
  ref = logp + jnp.asarray(d, jnp.float32)
  cfg = cfg_for(kl_beta=0.1)
  # ρ = 1 and A = 0: only the KL term remains.
  out = loss.per_token_loss(logp, logp, jnp.zeros(1), cfg, ref)
  np.testing.assert_allclose(out, 0.1 * np.array([k3]), rtol=1e-5, atol=1e-7)
  # d/dlogp k3 = 1 - e^d.
  g = jax.grad(
    lambda lp: loss.per_token_loss(lp, logp, jnp.zeros(1), cfg, ref).sum()
  )(logp)
  np.testing.assert_allclose(g, 0.1 * (1 - np.exp(d)), rtol=1e-5, atol=1e-7)
  value, m = pg_loss(
    logp, logp, jnp.zeros(1), jnp.ones((1, 3), bool), cfg, ref_logp=ref
  )
  assert float(value) == pytest.approx(0.1 * sum(k3) / 3, rel=1e-5)
  assert float(m["kl_mean"]) == pytest.approx(sum(k3) / 3, rel=1e-5)


def test_kl_reported_without_penalty_and_required_with_it():
  logp = jnp.zeros((1, 2))
  ref = jnp.asarray([[L(2.0), 0.0]], jnp.float32)
  value, m = pg_loss(
    logp, logp, jnp.ones(1), jnp.ones((1, 2), bool), cfg_for(), ref_logp=ref
  )
  assert float(value) == pytest.approx(-1.0)  # β = 0: KL not in the loss
  assert float(m["kl_mean"]) == pytest.approx((1 - L(2.0)) / 2, rel=1e-5)
  with pytest.raises(ValueError, match="ref_logp"):
    pg_loss(
      logp, logp, jnp.ones(1), jnp.ones((1, 2), bool), cfg_for(kl_beta=0.1)
    )


def test_mask_truncated_hand_computed():
  # ρ = 1, so ℓ = -A on every token; A = [1, 5, -2], two tokens each.
  logp = jnp.zeros((3, 2))
  adv, mask = jnp.asarray([1.0, 5.0, -2.0]), jnp.ones((3, 2), bool)
  trunc = jnp.asarray([False, True, False])
  keep = lambda agg, mt: float(
    pg_loss(
      logp, logp, adv, mask, cfg_for(agg, mask_truncated=mt), truncated=trunc
    )[0]
  )
  assert keep("token_mean", False) == pytest.approx((-2 - 10 + 4) / 6)
  assert keep("token_mean", True) == pytest.approx((-2 + 4) / 4)
  assert keep("seq_mean_token_mean", True) == pytest.approx((-1 + 2) / 2)
  assert keep("seq_mean_token_sum_norm", True) == pytest.approx(
    (-2 / 4 + 4 / 4) / 2
  )
  cfg = cfg_for(mask_truncated=True)
  assert float(loss.loss_denominator(mask, cfg, trunc)) == 4
  _, m = pg_loss(logp, logp, adv, mask, cfg, truncated=trunc)
  assert float(m["tokens"]) == 4
  with pytest.raises(ValueError, match="truncated"):
    pg_loss(logp, logp, adv, mask, cfg)


def test_empty_batch_is_zero_not_nan():
  z = jnp.zeros((2, 3))
  for agg in AGGS:
    value, m = pg_loss(z, z, jnp.ones(2), jnp.zeros((2, 3), bool), cfg_for(agg))
    assert float(value) == 0.0 and float(m["clip_frac"]) == 0.0


def test_shape_errors():
  z = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="old_logp"):
    loss.pg_loss_terms(z, jnp.zeros((2, 4)), jnp.ones(2), z > 0, cfg_for())
  with pytest.raises(ValueError, match=r"adv must be \[B\]"):
    loss.pg_loss_terms(z, z, jnp.ones((2, 1)), z > 0, cfg_for())
  with pytest.raises(ValueError, match="truncated must be"):
    loss.pg_loss_terms(
      z,
      z,
      jnp.ones(2),
      z > 0,
      cfg_for(mask_truncated=True),
      truncated=jnp.zeros(3, bool),
    )


# ---------------------------------------------------------------------------
# Properties on random batches.


def random_batch(seed, b=12, n=7):
  rng = np.random.default_rng(seed)
  lens = rng.integers(0, n + 1, size=b)
  lens[0] = n
  mask = np.arange(n)[None] < lens[:, None]
  logp = -rng.exponential(size=(b, n))
  old = logp + rng.normal(scale=0.3, size=(b, n))  # many ρ outside the clip
  ref = logp + rng.normal(scale=0.2, size=(b, n))
  adv = rng.normal(size=b)
  trunc = rng.random(b) < 0.3
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return (
    f32(logp),
    f32(old),
    f32(adv),
    jnp.asarray(mask),
    f32(ref),
    jnp.asarray(trunc),
  )


def _token_weights(mask, agg, max_len_norm):
  """Weight of each token in the aggregate ``agg``."""
  m = np.asarray(mask, np.float64)
  n_seq = (m.sum(1) > 0).sum()
  return {
    "token_mean": m / m.sum(),
    "seq_mean_token_mean": m / np.maximum(m.sum(1, keepdims=True), 1) / n_seq,
    "seq_mean_token_sum_norm": m / max_len_norm / n_seq,
  }[agg]


@pytest.mark.parametrize("agg", AGGS)
def test_ratio_one_gives_minus_advantage_and_its_gradient(agg):
  logp, _, adv, mask, _, _ = random_batch(1)
  cfg = cfg_for(agg, max_len_norm=9)
  w = _token_weights(mask, agg, 9)
  f = lambda lp: pg_loss(lp, logp, adv, mask, cfg)[0]
  value, grad = jax.value_and_grad(f)(logp)
  a = np.asarray(adv, np.float64)[:, None]
  assert float(value) == pytest.approx(
    float(np.sum(-a * w)), rel=1e-5, abs=1e-7
  )
  np.testing.assert_allclose(grad, -a * w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", AGGS)
def test_per_token_advantages_at_ratio_one(agg):
  """[B, L] advantages: the loss is −Σ w·A_t and its gradient −w·A_t."""
  logp, _, _, mask, _, _ = random_batch(1)
  a = np.random.default_rng(7).normal(size=logp.shape)
  cfg = cfg_for(agg, max_len_norm=9)
  w = _token_weights(mask, agg, 9)
  adv = jnp.asarray(a, jnp.float32)
  f = lambda lp: pg_loss(lp, logp, adv, mask, cfg)[0]
  value, grad = jax.value_and_grad(f)(logp)
  assert float(value) == pytest.approx(float(np.sum(-a * w)), rel=1e-5)
  np.testing.assert_allclose(grad, -a * w, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r"adv must be \[B\]"):
    pg_loss(logp, logp, adv[:, :2], mask, cfg)


@pytest.mark.parametrize("mask_truncated", [False, True])
@pytest.mark.parametrize(
  "agg, kind",
  [(a, "ppo") for a in AGGS]
  + [("seq_mean_token_mean", "gspo"), ("token_mean", "cispo")],
)
@pytest.mark.slow
def test_micro_batch_splits_sum_to_full_batch_loss(agg, kind, mask_truncated):
  logp, old, adv, mask, ref, trunc = random_batch(2)
  if kind == "gspo":  # sequence ratios near 1, some outside GSPO's range
    old = logp + jnp.asarray(
      np.random.default_rng(5).normal(scale=1e-3, size=logp.shape),
      jnp.float32,
    )
  cfg = cfg_for(
    agg, kl_beta=0.05, mask_truncated=mask_truncated, max_len_norm=7,
    kind=kind,
  )  # fmt: skip
  full, full_m = pg_loss(
    logp, old, adv, mask, cfg, ref_logp=ref, truncated=trunc
  )
  den = loss.loss_denominator(mask, cfg, trunc)
  for split in ([12], [3, 5, 4], [1] * 12, [7, 5]):
    num, sums = 0.0, None
    for sl in np.split(np.arange(12), np.cumsum(split)[:-1]):
      n_i, s_i = loss.pg_loss_terms(
        logp[sl],
        old[sl],
        adv[sl],
        mask[sl],
        cfg,
        ref_logp=ref[sl],
        truncated=trunc[sl],
      )
      num = num + n_i
      sums = s_i if sums is None else loss.combine_sums(sums, s_i)
    assert abs(float(num / den) - float(full)) < 1e-6, split
    for k, v in loss.reduce_metrics(sums).items():
      assert float(v) == pytest.approx(float(full_m[k]), rel=1e-5, abs=1e-6), k
  assert 0 < float(full_m["clip_frac"]) < 1  # the clip is exercised


def test_gspo_value_and_gradient_are_the_sequence_objective():
  """GSPO-token with one advantage per row: value and gradient of
  −(1/N) Σ_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t(logp − old))."""
  rng = np.random.default_rng(11)
  b, n = 6, 5
  logp, _, adv, _, _, _ = random_batch(4, b=b, n=n)
  lens = np.array([5, 3, 4, 1, 5, 2])
  mask = jnp.asarray(np.arange(n)[None] < lens[:, None])
  # per-row mean log-ratio: ±2e-4 (inside the clip), ±1e-3 (outside)
  shift = np.array([2e-4, -2e-4, 1e-3, -1e-3, 1e-3, -1e-3])
  noise = rng.normal(scale=1e-4, size=(b, n))
  noise -= (noise * np.asarray(mask)).sum(1, keepdims=True) / lens[:, None]
  old = logp - jnp.asarray(shift[:, None] + noise, jnp.float32)
  adv = jnp.asarray([1.0, -1.0, 1.0, -1.0, -1.0, 1.0], jnp.float32)
  cfg = cfg_for("seq_mean_token_mean", kind="gspo")
  m = np.asarray(mask, np.float32)

  def reference(lp):
    seq = jnp.sum((lp - old) * m, 1) / lens
    s = jnp.exp(seq)
    clipped = jnp.clip(s, 1 - 3e-4, 1 + 4e-4)
    return -jnp.mean(jnp.minimum(s * adv, clipped * adv))

  f = lambda lp: pg_loss(lp, old, adv, mask, cfg)[0]
  v, g = jax.value_and_grad(f)(logp)
  rv, rg = jax.value_and_grad(reference)(logp)
  assert float(v) == pytest.approx(float(rv), rel=1e-6)
  np.testing.assert_allclose(g, rg, atol=1e-7)
  # rows 0-1 inside the range, row 2 (s > 1 + ε, A > 0) and row 3
  # (s < 1 − ε, A < 0) clipped: no gradient; rows 4-5 clipped on the other
  # side keep it. By hand: ∂/∂logp_t = −s A / (|y| N) on counted tokens.
  s = np.exp(shift)
  want = -(s * np.asarray(adv))[:, None] * m / lens[:, None] / b
  want[2:4] = 0
  np.testing.assert_allclose(g, want, rtol=1e-4, atol=1e-9)
  _, met = pg_loss(logp, old, adv, mask, cfg)
  assert float(met["clip_frac"]) == pytest.approx((4 + 1) / lens.sum())


def test_cispo_keeps_the_gradient_of_clipped_tokens():
  """−sg(clip(ρ)) A log π: gradient −clip(ρ)·A·w everywhere, also where
  PPO's clip stops it."""
  logp = jnp.log(jnp.asarray([[0.5, 0.5, 0.5]], jnp.float32))
  ratio = np.array([0.5, 1.0, 1.6])  # below, inside, above [0.8, 1.2]
  old = logp - jnp.log(jnp.asarray(ratio[None], jnp.float32))
  mask = jnp.ones((1, 3), bool)
  for a in (1.0, -1.0):
    adv = jnp.asarray([a], jnp.float32)
    cfg = cfg_for("token_mean", kind="cispo")
    f = lambda lp, c=cfg, a_=adv: pg_loss(lp, old, a_, mask, c)[0]
    v, g = jax.value_and_grad(f)(logp)
    w = np.clip(ratio, 0.8, 1.2)
    np.testing.assert_allclose(g[0], -w * a / 3, rtol=1e-6)
    assert float(v) == pytest.approx(float(-(w * a * np.log(0.5)).mean()))
    ppo = jax.grad(lambda lp, a_=adv: pg_loss(lp, old, a_, mask, cfg_for())[0])
    assert np.sum(np.asarray(ppo(logp)) == 0) == 1  # PPO drops one token
    _, met = pg_loss(logp, old, adv, mask, cfg)
    assert float(met["clip_frac"]) == pytest.approx(2 / 3)


def tiny_model(mesh, vocab=64, seed=0):
  cfg = model.ModelConfig("llama", vocab, 32, 2, 4, 2, 8, 48)
  return model.init_model(cfg, mesh, sharding.TRAIN_RULES, seed=seed)


@pytest.fixture(scope="module")
def tiny(one_device_mesh):
  return tiny_model(one_device_mesh)


def ragged_tokens(seed, b, t, vocab):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, size=(b, t))
  pad = rng.integers(0, t // 3, size=b)  # left padding
  pad[0] = 0
  mask = np.arange(t)[None] >= pad[:, None]
  positions = np.maximum(np.arange(t)[None] - pad[:, None], 0)
  return tuple(jnp.asarray(x) for x in (tokens, positions, mask))


@pytest.mark.slow
def test_micro_batch_gradient_equals_full_batch(tiny):
  """Σ_i ∇(numerator_i / den) through a model = ∇ full-batch loss (fp32)."""
  m = tiny
  b, t, prompt = 4, 10, 3
  tokens, positions, mask = ragged_tokens(3, b, t, 64)
  lens = np.array([[6], [3], [5], [1]])
  comp = mask[:, prompt + 1 :] & jnp.asarray(np.arange(t - prompt - 1) < lens)
  trunc = jnp.asarray([True, False, False, True])
  cfgs = [
    cfg_for(agg, kl_beta=0.1, mask_truncated=True, max_len_norm=6)
    for agg in AGGS
  ]
  dens = [loss.loss_denominator(comp, c, trunc) for c in cfgs]

  def logp_of(mm, tok, pos, msk):
    return loss.token_logprobs(
      mm, tok, pos, msk, temperature=0.7, chunk=4, start=prompt
    )

  base = logp_of(m, tokens, positions, mask)
  rng = np.random.default_rng(4)
  old = base + jnp.asarray(rng.normal(scale=0.3, size=base.shape), jnp.float32)
  ref = base + jnp.asarray(rng.normal(scale=0.2, size=base.shape), jnp.float32)
  adv = jnp.asarray(rng.normal(size=b), jnp.float32)
  batch = (tokens, positions, mask, old, ref, adv, comp, trunc)

  @nnx.jit
  def grads(mm, tok, pos, msk, old, ref, adv, comp, trunc):
    """One gradient per aggregation, of numerator / whole-batch den."""

    def f(mm, cfg, den):
      lp = logp_of(mm, tok, pos, msk)
      num, _ = loss.pg_loss_terms(
        lp, old, adv, comp, cfg, ref_logp=ref, truncated=trunc
      )
      return num / den

    return [nnx.grad(f)(mm, c, d) for c, d in zip(cfgs, dens, strict=True)]

  full = jax.tree.leaves(grads(m, *batch))
  parts = [
    jax.tree.leaves(grads(m, *(x[sl] for x in batch)))
    for sl in (slice(0, 2), slice(2, 4))
  ]
  for g, g0, g1 in zip(full, *parts, strict=True):
    np.testing.assert_allclose(
      np.asarray(g0 + g1), np.asarray(g), atol=1e-6, rtol=0
    )
  assert min(float(jnp.abs(g).max()) for g in full) > 1e-4  # not trivially 0


# ---------------------------------------------------------------------------
# Chunked token log-probs.


def oracle_logprobs(m, tokens, positions, mask, temperature):
  logits, _ = m(tokens, positions, mask)
  lsm = jax.nn.log_softmax(logits / temperature, axis=-1)[:, :-1]
  logp = jnp.take_along_axis(lsm, tokens[:, 1:, None], axis=-1)[..., 0]
  ent = -jnp.sum(jnp.exp(lsm) * lsm, axis=-1)
  return logp, ent


@pytest.mark.slow
def test_token_logprobs_equal_full_logits(tiny):
  tokens, positions, mask = ragged_tokens(0, 3, 11, 64)
  chunks = (1, 3, 4, 10, 16)  # T - 1 = 10; 3 and 4 leave a remainder

  @nnx.jit
  def everything(m, tokens, positions, mask):
    out = {}
    for temp in (1.0, 0.7):
      out[f"{temp}/oracle"] = oracle_logprobs(m, tokens, positions, mask, temp)
      for c in chunks:
        out[f"{temp}/{c}"] = loss.token_logprobs(
          m,
          tokens,
          positions,
          mask,
          temperature=temp,
          chunk=c,
          return_entropy=True,
        )
      out[f"{temp}/start"] = loss.token_logprobs(
        m, tokens, positions, mask, temperature=temp, chunk=4, start=6
      )
      out[f"{temp}/plain"] = loss.token_logprobs(
        m, tokens, positions, mask, temperature=temp, chunk=3
      )
    return out

  out = everything(tiny, tokens, positions, mask)
  for temp in (1.0, 0.7):
    ref_logp, ref_ent = out[f"{temp}/oracle"]
    for c in chunks:
      logp, ent = out[f"{temp}/{c}"]
      assert logp.shape == (3, 10) and logp.dtype == jnp.float32
      np.testing.assert_allclose(logp, ref_logp, atol=1e-5, err_msg=str(c))
      np.testing.assert_allclose(ent, ref_ent, atol=1e-5, err_msg=str(c))
    np.testing.assert_allclose(out[f"{temp}/plain"], ref_logp, atol=1e-5)
    np.testing.assert_allclose(out[f"{temp}/start"], ref_logp[:, 6:], atol=1e-5)
  # Temperature changes the distribution (the check above is not vacuous).
  assert float(jnp.abs(out["1.0/4"][0] - out["0.7/4"][0]).max()) > 1e-2
  # Eager (unjitted) use works too.
  eager = loss.token_logprobs(tiny, tokens, positions, mask, chunk=4)
  np.testing.assert_allclose(eager, out["1.0/oracle"][0], atol=1e-5)


def test_token_logprobs_errors(tiny):
  m = tiny
  tokens, positions, mask = ragged_tokens(0, 2, 6, 64)
  for kw, word in [
    ({"temperature": 0.0}, "temperature"),
    ({"chunk": 0}, "chunk"),
    ({"start": 5}, "start"),
  ]:
    with pytest.raises(ValueError, match=word):
      loss.token_logprobs(m, tokens, positions, mask, **kw)


def _largest_array(jaxpr) -> int:
  """Largest intermediate (element count) in a jaxpr and its sub-jaxprs."""
  best = 0
  for eqn in jaxpr.eqns:
    for v in eqn.outvars:
      best = max(best, math.prod(getattr(v.aval, "shape", ())))
    for p in eqn.params.values():
      for sub in p if isinstance(p, (tuple, list)) else (p,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          best = max(best, _largest_array(sub))
  return best


def test_no_full_logits_intermediate():
  vocab, b, t, chunk = 1024, 4, 33, 4
  cfg = model.ModelConfig("llama", vocab, 32, 2, 4, 2, 8, 48)
  # Shapes only: tracing needs no weights.
  graphdef, state = nnx.split(model.abstract_model(cfg))
  tokens, positions, mask = ragged_tokens(1, b, t, vocab)
  full_size = b * (t - 1) * vocab

  def chunked(state):
    lp = loss.token_logprobs(
      nnx.merge(graphdef, state), tokens, positions, mask, chunk=chunk
    )
    return jnp.sum(lp)

  def naive(state):
    lp, _ = oracle_logprobs(
      nnx.merge(graphdef, state), tokens, positions, mask, 1.0
    )
    return jnp.sum(lp)

  for fn in (chunked, jax.grad(chunked)):
    biggest = _largest_array(jax.make_jaxpr(fn)(state).jaxpr)
    # The largest arrays are weights / attention scores (≈ B·T·V / 4), and
    # the [B, C, V] logits of one chunk (B·T·V / 8).
    assert biggest < full_size // 2, (fn, biggest, full_size)
  # The check can fail: the full-logits version does hold [B, T, V].
  assert (
    _largest_array(jax.make_jaxpr(jax.grad(naive))(state).jaxpr) >= full_size
  )


def _logp_and_grad(m, tokens, positions, mask):
  def f(m):
    lp = loss.token_logprobs(
      m, tokens, positions, mask, temperature=0.7, chunk=3, start=2
    )
    return jnp.sum(lp * mask[:, 3:]), lp

  (_, lp), grads = nnx.value_and_grad(f, has_aux=True)(m)
  return lp, grads


@pytest.mark.slow
def test_sharded_token_logprobs_match_single_device(tiny):
  """8 fake devices, data × fsdp × tensor = 2 × 2 × 2, vocab on 'tensor'."""
  tokens, positions, mask = ragged_tokens(5, 4, 11, 64)
  r_lp, r_grads = nnx.jit(_logp_and_grad)(tiny, tokens, positions, mask)
  mesh, rules = sharding.make_mesh(2, 2, 2), sharding.TRAIN_RULES
  batch = sharding.named(("batch", None), tokens.shape, mesh, rules)
  args = [jax.device_put(a, batch) for a in (tokens, positions, mask)]
  graphdef, state = nnx.split(tiny)
  shardings = model.state_shardings(state, mesh, rules)
  m = nnx.merge(graphdef, jax.device_put(state, shardings))
  with sharding.activate(mesh, rules):
    lp, grads = nnx.jit(_logp_and_grad)(m, *args)
  head = nnx.state(m, nnx.Param)["lm_head"]
  assert "tensor" in str(head.sharding.spec)
  np.testing.assert_allclose(lp, r_lp, atol=1e-5)
  for g, r in zip(
    jax.tree.leaves(grads), jax.tree.leaves(r_grads), strict=True
  ):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5)


@pytest.mark.slow
def test_chunk_vjp_gradients_equal_autodiff_of_full_logits(tiny):
  """The hand-written backward of the chunked head (log-probs *and*
  entropy, w.r.t. every parameter and the temperature) = autodiff of the
  full-logits oracle, for a loss weighting both with random cotangents."""
  tokens, positions, mask = ragged_tokens(2, 3, 11, 64)
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 10)), jnp.float32)
  graphdef, state = nnx.split(tiny)

  def ours(state, temp):
    m = nnx.merge(graphdef, state)
    lp, ent = loss.token_logprobs(
      m, tokens, positions, mask, temperature=temp, chunk=4,
      return_entropy=True,
    )  # fmt: skip
    return jnp.sum(a * lp) + jnp.sum(b * ent)

  def oracle(state, temp):
    lp, ent = oracle_logprobs(
      nnx.merge(graphdef, state), tokens, positions, mask, temp
    )
    return jnp.sum(a * lp) + jnp.sum(b * ent)

  temp = jnp.float32(0.7)
  v1, (g1, t1) = jax.jit(jax.value_and_grad(ours, (0, 1)))(state, temp)
  v2, (g2, t2) = jax.jit(jax.value_and_grad(oracle, (0, 1)))(state, temp)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(t1, t2, rtol=1e-4)
  assert abs(float(t2)) > 1e-3  # the temperature gradient is not trivially 0
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5)


def _numpy_support(z, top_k, top_p):
  """bool [..., V]: top-k, then top-p (smallest prefix reaching top_p) of
  softmax(z), row by row in float64."""
  keep = np.zeros(z.shape, bool)
  for idx in np.ndindex(z.shape[:-1]):
    order = np.argsort(-z[idx])[: top_k or None]
    p = np.exp(z[idx][order] - z[idx][order].max())
    p /= p.sum()
    n = int(np.searchsorted(np.cumsum(p) - p, top_p, side="left"))
    keep[idx + (order[: max(n, 1)],)] = True
  return keep


@pytest.mark.slow
def test_truncated_support_logprobs_and_gradients(tiny):
  """support=Support(top_k, top_p): log-probs and entropies of softmax(z)
  renormalised over the sampler's support plus the target (so every value
  is finite), against a float64 numpy oracle; the chunked backward equals
  autodiff of the same masked log-softmax."""
  tokens, positions, mask = ragged_tokens(4, 3, 11, 64)
  graphdef, state = nnx.split(tiny)
  support = support_lib.Support(top_k=20, top_p=0.8)
  temp = 0.7
  logits, _ = tiny(tokens, positions, mask)
  z = np.asarray(logits, np.float64)[:, :-1] / temp
  y = np.asarray(tokens)[:, 1:]
  hit = np.arange(z.shape[-1]) == y[..., None]
  keep = _numpy_support(z, 20, 0.8) | hit
  assert 0.2 < keep.mean() < 0.4  # the support is a real truncation
  zk = np.where(keep, z, -np.inf)
  lse = zk.max(-1) + np.log(np.exp(zk - zk.max(-1, keepdims=True)).sum(-1))
  want_lp = np.take_along_axis(z, y[..., None], -1)[..., 0] - lse
  q = np.exp(zk - lse[..., None])
  want_ent = -np.sum(np.where(keep, q * (z - lse[..., None]), 0.0), -1)

  def ours(state, t):
    m = nnx.merge(graphdef, state)
    return loss.token_logprobs(
      m, tokens, positions, mask, temperature=t, chunk=4,
      return_entropy=True, support=support,
    )  # fmt: skip

  lp, ent = jax.jit(ours)(state, jnp.float32(temp))
  np.testing.assert_allclose(lp, want_lp, atol=2e-5)
  np.testing.assert_allclose(ent, want_ent, atol=2e-5)

  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  b = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  kmask = jnp.asarray(keep)

  def objective(state, t):
    lp, ent = ours(state, t)
    return jnp.sum(a * lp) + jnp.sum(b * ent)

  def oracle(state, t):
    logits, _ = nnx.merge(graphdef, state)(tokens, positions, mask)
    zz = jnp.where(kmask, logits[:, :-1] / t, -1e30)  # finite: no NaN grad
    lsm = jax.nn.log_softmax(zz, axis=-1)
    lp = jnp.take_along_axis(lsm, tokens[:, 1:, None], axis=-1)[..., 0]
    ent = -jnp.sum(jnp.where(kmask, jnp.exp(lsm) * lsm, 0.0), axis=-1)
    return jnp.sum(a * lp) + jnp.sum(b * ent)

  t = jnp.float32(temp)
  v1, (g1, t1) = jax.jit(jax.value_and_grad(objective, (0, 1)))(state, t)
  v2, (g2, t2) = jax.jit(jax.value_and_grad(oracle, (0, 1)))(state, t)
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  np.testing.assert_allclose(t1, t2, rtol=1e-4)
  for x, w in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(w), atol=2e-5)
