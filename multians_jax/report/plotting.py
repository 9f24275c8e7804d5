"""Matplotlib, imported where a plot is drawn and not before: importing
the package's numeric modules (``metrics``, ``config``) stays free of it,
and its backend is set once, to Agg (files, no display)."""


def pyplot():
  """``matplotlib.pyplot`` with the Agg backend."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
