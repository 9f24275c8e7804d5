"""Benchmarks: what ``tools/bench.py``, ``tools/bench_ab.py`` and
``tools/bench_reward.py`` measure (``measure``, ``reward``) and the torch
references they compare against (``torch_ref``, importable without JAX).
"""
