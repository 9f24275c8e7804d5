"""The RL math.

Output ``parsing``, answer ``matchers`` (code runs in the ``sandbox``),
the set-``reward`` kernel, per-answer ``credit``, group ``advantage``
estimators, the policy-gradient ``loss``, the ``update`` step (its
token-budget micro-batches in ``microbatch``, packed completions in
``packing``), and ``rollouts`` (sample and score one batch).
"""
