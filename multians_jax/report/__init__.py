"""The reporting wing.

A run's REPORT.md (``run``), comparisons of several runs (``compare``),
model cards (``card``) and figures; matplotlib is imported only here
(``plotting.pyplot``), where a plot is drawn.
"""
