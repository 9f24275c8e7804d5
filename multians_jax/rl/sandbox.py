"""Sandboxed execution of candidate Python code against tests (METHOD §4).

The policy is an adversary of its grader, so the design keeps the candidate
away from everything that decides the grade:

* Two processes. A trusted *harness* runs the task's tests; the candidate
  code runs in a separate *worker*. The tests see each candidate function as
  a proxy: arguments go to the worker, results come back as plain data
  (``marshal`` of None/bool/int/float/complex/str/bytes and containers of
  those, checked on arrival), so a candidate cannot return objects with a
  rigged ``__eq__``, patch the test code or its builtins, or skip the tests.
* The verdict is a random nonce that the parent hands to the harness on its
  stdin; the harness prints it only after every test returned. The worker
  never holds the nonce, and ``os._exit(0)``, printed "success" text or a
  zero exit status are all ignored: the parent compares the harness's stdout
  with the nonce and nothing else.
* Containment. With ``unshare`` (util-linux) the worker lives in fresh PID,
  mount and network namespaces (no network; ``/proc`` shows only itself;
  fresh size-limited tmpfs on ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
  ``/run/lock``, gone with the namespace; cwd ``/tmp``). As root it drops to
  uid/gid ``nobody`` (so it cannot signal, trace or write the harness, nor
  write root-owned files); without root an unprivileged user namespace is
  used. Whatever the candidate starts dies with the namespace: its init is
  a root-owned supervisor that exits with the candidate and dies with the
  harness (``--kill-child``). Resource limits: address space, CPU seconds,
  processes (RLIMIT_NPROC, for uid ``nobody``), file size, core dumps. The
  environment is empty. On timeout the parent kills the harness's process
  group, which takes the namespace down.
* Fallback (no usable ``unshare``): the worker is a plain child with the
  same resource limits, empty environment and a temp cwd, in the harness's
  process group. That mode cannot block network access or writes elsewhere
  and a same-uid candidate could read the harness's memory; the module
  warns once. ``containment()`` says which mode is active.

Known limit: tests that pass non-data arguments (callables, custom objects)
to the candidate, or rely on in-place mutation of arguments, cannot be run
through the proxy and grade as failures.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

TIMEOUT_S = 5.0
MEMORY_MB = 512
NOBODY = 65534

_HARNESS = r"""
import ast, builtins, json, marshal, os, subprocess, sys
cfg = json.loads(sys.stdin.read())
nonce = cfg.pop("nonce")
OK = (type(None), bool, int, float, complex, str, bytes)
def check(x, depth=0):
  if depth > 50: raise ValueError("result nested too deep")
  if isinstance(x, dict):
    for k, v in x.items(): check(k, depth + 1); check(v, depth + 1)
  elif type(x) in (list, tuple, set, frozenset):
    for v in x: check(v, depth + 1)
  elif type(x) not in OK: raise TypeError("non-data result")
  return x
r1, w1 = os.pipe(); r2, w2 = os.pipe()
proc = subprocess.Popen(cfg["prefix"] + [sys.executable, "-I", "-S", "-c",
  cfg["worker"], str(r1), str(w2), json.dumps(cfg["limits"]), cfg["run_id"]],
  pass_fds=(r1, w2), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
  stderr=subprocess.DEVNULL, env={}, cwd="/")
os.close(r1); os.close(w2)
def send(obj):
  data = marshal.dumps(obj)
  os.write(w1, len(data).to_bytes(8, "little"))
  view = memoryview(data)
  while view: view = view[os.write(w1, view):]
def read(n):
  buf = b""
  while len(buf) < n:
    chunk = os.read(r2, min(n - len(buf), 1 << 20))
    if not chunk: raise EOFError("worker died")
    buf += chunk
  return buf
def recv():
  n = int.from_bytes(read(8), "little")
  if n > cfg["limits"]["max_bytes"]: raise ValueError("reply too large")
  return check(marshal.loads(read(n)))
def proxy(name):
  def call(*args, **kwargs):
    send((name, args, kwargs))
    reply = recv()
    if reply[0] == "ret": return reply[1]
    exc = getattr(builtins, str(reply[1]), None)
    if not (isinstance(exc, type) and issubclass(exc, Exception)):
      exc = RuntimeError
    raise exc(str(reply[2]))
  return call
try:
  tree = ast.parse(cfg["source"])
  funcs = [n.name for n in tree.body
           if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
  if not funcs: raise SystemExit(2)
  send(("src", cfg["source"]))
  if recv() != ("ok",): raise SystemExit(3)
  ns = {name: proxy(name) for name in funcs}
  ns["__name__"] = "__tests__"
  verdict, sys.stdout = sys.stdout, open(os.devnull, "w")  # tests may print
  exec(compile(cfg["tests"], "tests.py", "exec"), ns)
  if callable(ns.get("check")):
    entry = cfg["entry_point"] or ns.get("ENTRY_POINT") or funcs[-1]
    ns["check"](ns[entry] if entry in funcs else None)
  verdict.write(nonce); verdict.flush()
finally:
  proc.kill(); proc.wait()
"""

_WORKER = r"""
import json, marshal, os, resource, sys
r, w, limits = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
if limits["namespaces"]:
  import ctypes
  libc = ctypes.CDLL(None, use_errno=True)
  for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
    if os.path.isdir(d) and libc.mount(b"tmpfs", d.encode(), b"tmpfs", 0,
                                       b"size=16m,mode=1777") != 0:
      os._exit(5)
if limits["drop_uid"]:
  # uid nobody may not traverse the interpreter's prefix (e.g. /root/...):
  # expose it through a bind mount and point sys.path there.
  base, view = sys.base_prefix, "/tmp/.python"
  os.mkdir(view, 0o755)
  if libc.mount(base.encode(), view.encode(), None, 4096, None) != 0:
    os._exit(5)
  move = lambda ps: [view + p[len(base):] if p.startswith(base) else p
                     for p in ps]
  sys.path = move(sys.path)
  for m in list(sys.modules.values()):
    if isinstance(getattr(m, "__path__", None), list):
      m.__path__[:] = move(m.__path__)
  sys.path_importer_cache.clear()
pid = os.fork()
if pid:
  os.close(r); os.close(w)
  while True:
    try:
      if os.waitpid(-1, 0)[0] == pid: os._exit(0)
    except ChildProcessError:
      os._exit(0)
if limits["drop_uid"]:
  os.setgroups([]); os.setgid(limits["uid"]); os.setuid(limits["uid"])
  if os.getuid() == 0 or os.geteuid() == 0: os._exit(6)
mem = limits["memory_mb"] << 20
for res, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CORE, 0),
                 (resource.RLIMIT_CPU, limits["cpu_s"]),
                 (resource.RLIMIT_FSIZE, 1 << 20),
                 (resource.RLIMIT_NPROC, limits["nproc"])):
  resource.setrlimit(res, (val, val))
os.chdir(limits["cwd"])
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2): os.dup2(null, fd)
def read(n):
  buf = b""
  while len(buf) < n:
    chunk = os.read(r, n - len(buf))
    if not chunk: os._exit(0)
    buf += chunk
  return buf
def recv(): return marshal.loads(read(int.from_bytes(read(8), "little")))
def send(obj):
  try: data = marshal.dumps(obj)
  except Exception: data = marshal.dumps(("err", "TypeError", "bad result"))
  os.write(w, len(data).to_bytes(8, "little"))
  view = memoryview(data)
  while view: view = view[os.write(w, view):]
del sys.argv[1:]
ns = {"__name__": "__main__", "__builtins__": __builtins__}
try:
  exec(compile(recv()[1], "candidate.py", "exec"), ns)
  send(("ok",))
except BaseException as e:
  send(("err", type(e).__name__, str(e)[:200])); os._exit(1)
while True:
  name, args, kwargs = recv()
  try: send(("ret", ns[name](*args, **kwargs)))
  except BaseException as e: send(("err", type(e).__name__, str(e)[:200]))
"""


@dataclasses.dataclass(frozen=True)
class Result:
  """Outcome of one sandboxed run.

  Attributes:
    passed: every test ran to the end and passed.
    status: ``passed``, ``failed`` or ``timeout``.
    seconds: wall time.
    run_id: a tag in the worker's command line (to find leftovers).
  """

  passed: bool
  status: str
  seconds: float
  run_id: str


@functools.lru_cache(maxsize=1)
def containment() -> str:
  """``root`` (namespaces + uid nobody), ``userns`` or ``none``."""
  exe = shutil.which("unshare")
  if exe is None:
    return "none"
  for mode in ("root", "userns") if os.geteuid() == 0 else ("userns",):
    probe = _prefix(mode, exe) + ["true"]
    try:
      ok = subprocess.run(probe, capture_output=True, timeout=10).returncode
    except (OSError, subprocess.SubprocessError):
      continue
    if ok == 0:
      return mode
  warnings.warn(
    "code sandbox: unshare unusable; running candidates without namespaces "
    "(no network or filesystem isolation)",
    stacklevel=2,
  )
  return "none"


def _prefix(mode: str, exe: str | None = None) -> list[str]:
  if mode == "none":
    return []
  exe = exe or shutil.which("unshare")
  ns = ["--fork", "--pid", "--kill-child", "--mount-proc", "--mount", "--net"]
  user = ["--user", "--map-root-user"] if mode == "userns" else []
  return [exe] + user + ns


def strip_fences(source: str) -> str:
  """Removes a surrounding Markdown code fence, if any."""
  s = source.strip()
  if s.startswith("```"):
    s = s.split("\n", 1)[1] if "\n" in s else ""
    s = s[: s.rfind("```")] if "```" in s else s
  return s.strip("\n")


def _harness_input(source, tests, entry_point, nonce, run_id, mode, tmp, lim):
  return json.dumps(
    dict(
      nonce=nonce,
      source=source,
      tests=tests,
      entry_point=entry_point,
      run_id=run_id,
      prefix=_prefix(mode),
      worker=_WORKER,
      limits=dict(
        lim,
        namespaces=mode != "none",
        drop_uid=mode == "root",
        uid=NOBODY,
        cwd="/tmp" if mode != "none" else tmp,
        max_bytes=64 << 20,
      ),
    )
  )


def run_tests(
  source: str,
  tests: str,
  *,
  entry_point: str | None = None,
  timeout_s: float = TIMEOUT_S,
  memory_mb: int = MEMORY_MB,
) -> Result:
  """Runs ``tests`` against candidate ``source`` in the sandbox.

  Args:
    source: candidate Python code defining one or more functions.
    tests: test code: ``assert f(...) == ...`` lines calling the candidate's
      functions by name, and/or a HumanEval-style ``check(candidate)``
      (called with ``entry_point``, else the tests' ``ENTRY_POINT``, else the
      last function the candidate defines).
    entry_point: the function passed to ``check``.
    timeout_s: wall-clock limit for the whole run.
    memory_mb: address-space limit of the worker.

  Returns:
    ``Result``; ``passed`` only when the harness printed the nonce.
  """
  mode = containment()
  nonce, run_id = secrets.token_hex(16), "sbx" + secrets.token_hex(8)
  limits = dict(memory_mb=memory_mb, cpu_s=int(timeout_s) + 1, nproc=64)
  start = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="multians_sbx_") as tmp:
    os.chmod(tmp, 0o777)
    payload = _harness_input(
      strip_fences(source), tests, entry_point, nonce, run_id, mode, tmp, limits
    )
    proc = subprocess.Popen(
      [sys.executable, "-I", "-S", "-c", _HARNESS],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      env={},
      cwd=tmp,
      start_new_session=True,
    )
    try:
      out, _ = proc.communicate(payload.encode(), timeout=timeout_s)
      status = "passed" if out.decode(errors="replace") == nonce else "failed"
    except subprocess.TimeoutExpired:
      status = "timeout"
    finally:
      _kill_group(proc)
  return Result(status == "passed", status, time.monotonic() - start, run_id)


def _kill_group(proc: subprocess.Popen) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  proc.communicate()


def code_key(source: str) -> str:
  """Normalised source for distinctness: the AST dump when it parses
  (comments and formatting ignored), else whitespace-collapsed text."""
  s = strip_fences(source)
  try:
    return ast.dump(ast.parse(s))
  except (SyntaxError, ValueError, RecursionError, MemoryError):
    return " ".join(s.split())


def code_match(answer: str, entries, tests: str | None) -> int:
  """0 when the candidate passes ``tests`` in the sandbox, else -1."""
  del entries
  if not tests:
    raise ValueError("code matcher: the task has no tests")
  return 0 if run_tests(answer, tests).passed else -1
