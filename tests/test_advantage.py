"""Group advantages against hand-computed numbers and their properties."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multians_jax.rl import advantage

# Three groups of G = 4: mixed, flat (zero variance), one outlier.
REWARDS = np.array(
  [[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]],
  np.float32,
)
# Unbiased stds: group 0 sqrt(1/3), group 2 sqrt(6.75/3) = 1.5.
S0 = np.sqrt(1.0 / 3.0)
EXPECTED = {
  "drgrpo": [[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [-0.75, -0.75, -0.75, 2.25]],
  "grpo": [
    [x / (S0 + 1e-6) for x in (0.5, -0.5, -0.5, 0.5)],
    [0, 0, 0, 0],
    [x / (1.5 + 1e-6) for x in (-0.75, -0.75, -0.75, 2.25)],
  ],
  # r_i minus the mean of the three others.
  "rloo": [
    [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3],
    [0, 0, 0, 0],
    [0 - 1, 0 - 1, 0 - 1, 3 - 0],
  ],
}


@pytest.mark.parametrize("kind", advantage.KINDS)
def test_hand_computed(kind):
  adv, info = advantage.advantages(jnp.asarray(REWARDS), kind)
  np.testing.assert_allclose(adv, EXPECTED[kind], rtol=1e-6, atol=1e-7)
  assert adv.dtype == jnp.float32
  assert float(info["zero_std_frac"]) == pytest.approx(1 / 3)
  assert float(info["reward_mean"]) == pytest.approx(REWARDS.mean())
  # Population stds: 0.5, 0, sqrt(6.75/4).
  pop = (0.5 + 0 + np.sqrt(6.75 / 4)) / 3
  assert float(info["group_std_mean"]) == pytest.approx(pop, rel=1e-6)


def test_grpo_population_std_option():
  adv, _ = advantage.advantages(jnp.asarray(REWARDS), "grpo", std_ddof=0)
  s2 = np.sqrt(6.75 / 4)
  np.testing.assert_allclose(adv[0], np.array([1, -1, -1, 1]) / (1 + 2e-6))
  np.testing.assert_allclose(
    adv[2], np.array([-0.75, -0.75, -0.75, 2.25]) / (s2 + 1e-6), rtol=1e-6
  )


def test_flat_group_gets_exact_zero_even_when_mean_rounds():
  # 0.1 is not representable: the float mean of equal values can differ
  # from them by an ulp, and grpo would divide that by 1e-6.
  r = jnp.full((2, 7), 0.1, jnp.float32).at[1].set(1 / 3)
  for kind in advantage.KINDS:
    adv, info = advantage.advantages(r, kind)
    assert np.all(np.asarray(adv) == 0.0), kind
    assert float(info["zero_std_frac"]) == 1.0


@pytest.mark.parametrize("seed", range(3))
def test_properties_random(seed):
  rng = np.random.default_rng(seed)
  r = rng.normal(size=(5, 6)).astype(np.float32)
  r[1] = 0.25  # one flat group
  get = lambda rr, k: np.asarray(advantage.advantages(jnp.asarray(rr), k)[0])
  dr, gr, lo = (get(r, k) for k in ("drgrpo", "grpo", "rloo"))
  for a in (dr, gr, lo):
    np.testing.assert_allclose(a.sum(axis=1), 0.0, atol=1e-5)
  # rloo is drgrpo scaled by G / (G - 1); grpo has unit unbiased std.
  np.testing.assert_allclose(lo, dr * 6 / 5, rtol=1e-5, atol=1e-6)
  live = np.arange(5) != 1
  np.testing.assert_allclose(gr[live].std(axis=1, ddof=1), 1.0, rtol=1e-4)
  # Shifting a group's rewards changes no advantage; grpo is scale-free.
  shift = rng.normal(size=(5, 1)).astype(np.float32)
  np.testing.assert_allclose(get(r + shift, "drgrpo"), dr, atol=1e-5)
  np.testing.assert_allclose(get(3 * r, "grpo"), gr, rtol=1e-4, atol=1e-5)


def test_matches_torch_style_reference():
  # The reference: (r - mean) / (torch std (unbiased) + 1e-6), per group.
  rng = np.random.default_rng(7)
  r = rng.integers(0, 4, size=(4, 8)).astype(np.float32)
  r[0] = 2.0
  ref = (r - r.mean(1, keepdims=True)) / (
    r.std(1, ddof=1, keepdims=True) + 1e-6
  )
  adv, info = advantage.advantages(jnp.asarray(r), "grpo")
  np.testing.assert_allclose(adv, ref, rtol=1e-5, atol=1e-6)
  flat = np.mean(r.max(1) == r.min(1))
  assert float(info["zero_std_frac"]) == pytest.approx(flat)


def test_single_generation_groups():
  r = jnp.asarray([[1.0], [0.0], [3.0]])
  for kind in ("drgrpo", "grpo"):
    adv, info = advantage.advantages(r, kind)
    assert adv.shape == (3, 1)
    assert np.all(np.asarray(adv) == 0.0)
    assert float(info["zero_std_frac"]) == 1.0
  with pytest.raises(ValueError, match=r"rloo.*G=1"):
    advantage.advantages(r, "rloo")


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match="'ppo'"):
    advantage.advantages(jnp.zeros((2, 3)), "ppo")
  with pytest.raises(ValueError, match=r"\[P, G\].*\(6,\)"):
    advantage.advantages(jnp.zeros((6,)), "drgrpo")
  with pytest.raises(ValueError, match="std_ddof"):
    advantage.advantages(jnp.zeros((2, 3)), "grpo", std_ddof=2)


def test_jit_with_static_kind():
  f = jax.jit(advantage.advantages, static_argnames="kind")
  adv, info = f(jnp.asarray(REWARDS), kind="rloo")
  np.testing.assert_allclose(adv, EXPECTED["rloo"], rtol=1e-6, atol=1e-7)
  assert float(info["zero_std_frac"]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------ GDPO


def test_gdpo_hand_computed():
  # Group 0: format f = (1, 1, 1, 0), correctness D = (2, 0, 0, 0); group 1
  # flat.
  comps = np.zeros((2, 4, 2), np.float32)
  comps[0, :, 0] = [1, 1, 1, 0]
  comps[0, :, 1] = [2, 0, 0, 0]
  comps[1, :, 0] = 1
  # f: mean 3/4, unbiased std 1/2 → (1/4, 1/4, 1/4, −3/4) / 1/2;
  # D: mean 1/2, unbiased std 1 → (3/2, −1/2, −1/2, −1/2) / 1;
  # weights (1, 2): (3.5, −0.5, −0.5, −2.5) (each std + 1e-6); then divided
  # by the population std of the batch's 8 values (4 zeros).
  adv, info = advantage.gdpo_advantages(jnp.asarray(comps), (1.0, 2.0))
  e = 1e-6
  f_n = np.array([0.25, 0.25, 0.25, -0.75]) / (0.5 + e)
  d_n = np.array([1.5, -0.5, -0.5, -0.5]) / (1.0 + e)
  summed = f_n + 2 * d_n
  np.testing.assert_allclose(summed, [3.5, -0.5, -0.5, -2.5], rtol=1e-5)
  std = np.sqrt((summed**2).sum() / 8)
  np.testing.assert_allclose(adv[0], summed / (std + e), rtol=1e-6)
  np.testing.assert_array_equal(adv[1], 0.0)
  assert float(info["zero_std_frac"]) == 0.5
  assert float(info["gdpo/batch_std"]) == pytest.approx(std, rel=1e-6)
  # GRPO on the weighted total f + 2·D = (5, 1, 1, 0) lets D's larger
  # scale dominate: the format failure (row 3) is barely below rows 1–2,
  # where GDPO puts it 2 below them.
  grpo, _ = advantage.advantages(
    jnp.asarray(comps @ np.array([1.0, 2.0])), "grpo"
  )
  g = np.asarray(grpo[0])
  assert (g[1] - g[3]) / (g[0] - g[1]) == pytest.approx(1 / 4, rel=1e-5)
  a = np.asarray(adv[0])
  assert (a[1] - a[3]) / (a[0] - a[1]) == pytest.approx(2 / 4, rel=1e-5)


def test_gdpo_scale_invariance_and_errors():
  rng = np.random.default_rng(0)
  comps = rng.normal(size=(3, 5, 3)).astype(np.float32)
  a, _ = advantage.gdpo_advantages(jnp.asarray(comps), (1.0, 1.0, 1.0))
  # Rescaling or shifting one component leaves GDPO unchanged.
  c2 = comps.copy()
  c2[..., 2] = 100 * c2[..., 2] - 7
  b, _ = advantage.gdpo_advantages(jnp.asarray(c2), (1.0, 1.0, 1.0))
  np.testing.assert_allclose(a, b, atol=1e-4)
  assert float(jnp.std(a)) == pytest.approx(1.0, abs=1e-4)
  np.testing.assert_allclose(jnp.mean(a, axis=1), 0.0, atol=1e-5)
  with pytest.raises(ValueError, match="weights"):
    advantage.gdpo_advantages(jnp.asarray(comps), (1.0, 1.0))
  with pytest.raises(ValueError, match=r"\[P, G, C\]"):
    advantage.gdpo_advantages(jnp.asarray(comps[0]), (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="gdpo_advantages"):
    advantage.advantages(jnp.asarray(comps[..., 0]), "gdpo")


def _pkpo_by_subsets(g, k):
  """n · s^(loo−1) by its definition: over every k-subset I ∋ i, max_I g
  − max_{I∖i} g, averaged over the C(n, k) subsets."""
  n = len(g)
  s = np.zeros(n)
  for subset in itertools.combinations(range(n), k):
    top = max(g[j] for j in subset)
    for i in subset:
      s[i] += top - max(g[j] for j in subset if j != i)
  return n * s / math.comb(n, k)


@pytest.mark.parametrize("n,k", [(4, 2), (5, 3), (6, 6), (8, 3)])
def test_passk_matches_its_definition_with_ties(n, k):
  rng = np.random.default_rng(n * 10 + k)
  r = rng.integers(0, 3, (4, n)).astype(np.float32) / 2  # many ties
  adv, info = advantage.passk_advantages(jnp.asarray(r), k)
  want = np.stack([_pkpo_by_subsets(row, k) for row in r])
  np.testing.assert_allclose(adv, want, atol=1e-5)
  # The unbiased maxg@k estimate: the mean over k-subsets of their max.
  est = np.mean([
    np.mean([max(row[list(s)]) for s in itertools.combinations(range(n), k)])
    for row in r
  ])  # fmt: skip
  assert float(info["passk_estimate"]) == pytest.approx(est, rel=1e-5)


def test_passk_binary_closed_form_and_errors():
  """0/1 rewards, c of n = 8 correct, k = 3: a correct sample gets
  n · C(n−c, k−1) / C(n, k), a wrong one 0; a flat group nothing."""
  r = np.array([[1, 0, 0, 1, 0, 0, 0, 0], [1] * 8, [0] * 8], np.float32)
  adv, info = advantage.passk_advantages(jnp.asarray(r), 3)
  hit = 8 * math.comb(6, 2) / math.comb(8, 3)  # 8 · 15 / 56
  np.testing.assert_allclose(adv[0], r[0] * hit, atol=1e-6)
  np.testing.assert_array_equal(adv[1:], 0.0)
  assert float(info["zero_std_frac"]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match=r"rl.pass_k must lie in \[2, "):
    advantage.passk_advantages(jnp.asarray(r), 1)
  with pytest.raises(ValueError, match="num_generations=8"):
    advantage.passk_advantages(jnp.asarray(r), 9)


def test_passk_config_checks():
  from multians_jax.config import RunConfig

  ok = RunConfig.from_dict(
    dict(rl=dict(advantage="passk", pass_k=3, num_generations=8))
  )
  assert ok.rl.pass_k == 3
  with pytest.raises(ValueError, match="set rl.pass_k in"):
    RunConfig.from_dict(dict(rl=dict(advantage="passk", num_generations=8)))
  with pytest.raises(ValueError, match="rl.credit='sequence'"):
    RunConfig.from_dict(
      dict(
        rl=dict(advantage="passk", pass_k=2, credit="answer"),
        reward=dict(mode="multi_rlvr", correctness="count"),
      )
    )
