r"""Paper reproduction: Qwen3-8B, Multi-RLCR (K=3, confidences), DDXPlus.

  python -m multians_jax.main --config=configs/qwen3_8b_multi_rlcr.py:v5p \
      --workdir=gs://BUCKET/runs/qwen3_8b_multi_rlcr \
      --config.model.path=/path/to/Qwen3-8B \
      --config.data.jsonl=/data/ddxplus/train.jsonl,/data/ddxplus/test.jsonl

Argument: 'v5p' (TPU v5p-32, 16 chips) or 'gpu8' (one 8×H100 80 GB host).
See configs/paper.py for the shared reference hyperparameters.
"""

from configs import paper


def get_config(arg=None):
  return paper.get_paper_config("multi_rlcr", arg)
