"""The README's test command is what CI runs."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci.endswith("python -m pytest -q")
  assert f"```bash\n{ci}\n```" in readme


def test_the_readme_is_a_readme():
  """Set-up, the two commands and pointers; the reference lives in
  docs/GUIDE.md, results in BENCHMARKS.md and STUDY.md."""
  readme = (ROOT / "README.md").read_text()
  assert len(readme.splitlines()) <= 250
  demo = "python -m multians_jax.main --config=configs/demo.py"
  assert demo in readme and "python -m pytest -q" in readme
  assert (ROOT / "docs" / "GUIDE.md").exists() and "docs/GUIDE.md" in readme
