"""The package's shape: modules and functions under the size caps, no
import cycle."""

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "multians_jax"
MAX_LINES = 600
MAX_FUNCTION_LINES = 60  # of code, after the docstring


def _modules():
  for path in sorted(PKG.rglob("*.py")):
    rel = path.relative_to(PKG.parent).with_suffix("")
    name = ".".join(rel.parts).removesuffix(".__init__")
    yield name, path


def test_no_module_over_the_size_cap():
  """The package's modules and the tools (thin: their logic lives in the
  package)."""
  tools = sorted((PKG.parent / "tools").glob("*.py"))
  paths = [p for _, p in _modules()] + tools
  big = {
    str(p.relative_to(PKG.parent)): len(p.read_text().splitlines())
    for p in paths
    if len(p.read_text().splitlines()) > MAX_LINES
  }
  assert not big, big


def _function_lengths(path: pathlib.Path):
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
      first = node.body[0]
      value = getattr(first, "value", None)
      doc = isinstance(first, ast.Expr) and isinstance(value, ast.Constant)
      start = first.end_lineno + 1 if doc else first.lineno
      yield node.name, node.end_lineno - start + 1


def test_the_loop_is_only_the_loop():
  """loop.py keeps the loop: the policy, the update, checkpoint layout,
  warm-up and export live in their own modules."""
  lines = (PKG / "loop.py").read_text(encoding="utf-8").splitlines()
  assert len(lines) <= 400


def test_no_function_over_the_size_cap():
  big = {
    f"{n}.{fn}": length
    for n, p in _modules()
    for fn, length in _function_lengths(p)
    if length > MAX_FUNCTION_LINES
  }
  assert not big, big


def _runtime_imports(path: pathlib.Path, pkg: str) -> set[str]:
  """Package modules imported when ``path`` runs (``TYPE_CHECKING``-only
  imports excluded)."""
  tree = ast.parse(path.read_text())
  skip = set()
  for node in ast.walk(tree):
    test = getattr(node, "test", None)
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(test):
      skip |= {id(n) for n in ast.walk(node)}
  out = set()
  for node in ast.walk(tree):
    if id(node) in skip:
      continue
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == pkg:  # from multians_jax import x, y
        out |= {f"{pkg}.{a.name}" for a in node.names}
      elif node.module.startswith(pkg + "."):
        out.add(node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith(pkg + ".")}
  return out


def test_no_import_cycle():
  mods = dict(_modules())
  graph = {
    n: {m for m in _runtime_imports(p, "multians_jax") if m in mods and m != n}
    for n, p in mods.items()
  }
  for n in graph:  # a package's own submodules are not a cycle through it
    if mods[n].name == "__init__.py":
      graph[n] = {m for m in graph[n] if not m.startswith(n + ".")}
  state, cycles = {}, []

  def visit(n, path):
    state[n] = "open"
    for m in sorted(graph[n]):
      if state.get(m) == "open":
        cycles.append(path[path.index(m) :] + [m])
      elif m not in state:
        visit(m, path + [m])
    state[n] = "done"

  for n in sorted(graph):
    if n not in state:
      visit(n, [n])
  assert not cycles, cycles


def test_importing_the_config_draws_no_plots():
  """``import multians_jax.config`` (every tool and the entry point do)
  loads no matplotlib: it is imported where a plot is drawn."""
  import subprocess
  import sys

  code = (
    "import sys, multians_jax.config, multians_jax.metrics; "
    "print('matplotlib' in sys.modules)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  ).stdout
  assert out.strip().splitlines()[-1] == "False"
