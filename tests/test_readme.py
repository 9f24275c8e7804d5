"""The README's test command is what CI runs."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
  assert ci.endswith("python -m pytest -q")
  assert f"```bash\n{ci}\n```" in readme
