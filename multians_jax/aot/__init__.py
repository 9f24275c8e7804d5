"""Compile-only analysis: what a run needs before paying for devices.

The ``memory`` planner, ahead-of-time compilation of an RL step for
a TPU topology or GPU host (``step``, ``target``, ``report``), FLOP and
byte counts from HLO (``hlo_cost``) and decode-step ``profiling``.
"""
