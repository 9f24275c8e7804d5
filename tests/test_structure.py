"""The package's shape: modules and functions under the size caps, no
import cycle."""

import ast
import pathlib
import re

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
  path = PKG / "loop.py"
  assert len(path.read_text(encoding="utf-8").splitlines()) <= 400
  tree = ast.parse(path.read_text())
  typing_only = {  # under ``if TYPE_CHECKING:``: annotations, not coupling
    id(n)
    for node in ast.walk(tree)
    if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
    for n in ast.walk(node)
  }
  runtime = {
    m
    for node in ast.walk(tree)
    if id(node) not in typing_only
    for m in _imports_of(node, "multians_jax")
  }
  assert len(runtime) <= 10, sorted(runtime)


def test_no_function_over_the_size_cap():
  big = {
    f"{n}.{fn}": length
    for n, p in _modules()
    for fn, length in _function_lengths(p)
    if length > MAX_FUNCTION_LINES
  }
  assert not big, big


def _imports(path: pathlib.Path, pkg: str) -> set[str]:
  """Package modules ``path`` imports, ``TYPE_CHECKING``-only imports
  included (a cycle through a type annotation is still a cycle)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    out |= _imports_of(node, pkg)
  return out


def _imports_of(node, pkg: str) -> set[str]:
  """The package modules one import statement names: ``from pkg.sub
  import mod`` names ``pkg.sub.mod``, ``from pkg.mod import name`` names
  ``pkg.mod``."""
  if isinstance(node, ast.ImportFrom) and node.module:
    if node.module == pkg:  # from multians_jax import x, y
      return {f"{pkg}.{a.name}" for a in node.names}
    if node.module.startswith(pkg + "."):
      mods = {f"{node.module}.{a.name}" for a in node.names}
      return {m for m in mods if _is_module(m)} or {node.module}
  elif isinstance(node, ast.Import):
    return {a.name for a in node.names if a.name.startswith(pkg + ".")}
  return set()


def _is_module(name: str) -> bool:
  rel = pathlib.Path(*name.split(".")[1:])
  return (PKG / rel).with_suffix(".py").exists() or (PKG / rel).is_dir()


def test_no_import_cycle():
  mods = dict(_modules())
  graph = {
    n: {m for m in _imports(p, "multians_jax") if m in mods and m != n}
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


def test_importing_the_config_loads_no_model_code():
  """``import multians_jax.config`` (every tool and the entry point do)
  loads at most 12 package modules (the settings are a leaf: no model,
  sampler or loss code) and no matplotlib, which is imported where a plot
  is drawn."""
  import subprocess
  import sys

  code = (
    "import sys, multians_jax.config; "
    "print(sorted(m for m in sys.modules if m.startswith('multians_jax'))); "
    "import multians_jax.metrics; print('matplotlib' in sys.modules)"
  )
  out = (
    subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
    )
    .stdout.strip()
    .splitlines()
  )
  loaded = eval(out[-2])  # a printed list of module names
  assert len(loaded) <= 12, loaded
  assert "multians_jax.model.transformer" not in loaded
  assert out[-1] == "False"


def test_tools_and_package_patch_no_import_path():
  """Tools import the package and ``configs`` as installed (``pip install
  -e .`` maps both); tests import no tool. The sandbox's child process,
  which moves its own path list into a jail, is the one exception."""
  tools = sorted((PKG.parent / "tools").glob("*.py"))
  patched = [
    str(p.relative_to(PKG.parent))
    for p in [*(p for _, p in _modules()), *tools]
    if "sys.path.insert" in p.read_text() or "sys.path.append" in p.read_text()
  ]
  assert not patched, patched
  tests = sorted((PKG.parent / "tests").glob("test_*.py"))
  tool_names = "|".join(p.stem for p in tools)
  imports_a_tool = re.compile(rf"^\s*(import|from) ({tool_names})\b", re.M)
  importing_tools = [
    p.name for p in tests if imports_a_tool.search(p.read_text())
  ]
  assert not importing_tools, importing_tools
