"""Code sandbox: correct code passes, every escape attempt is contained."""

import os
import pathlib
import secrets
import socket
import time

import pytest

from multians_jax.rl import reward, sandbox

CHECK_ADD = """
def check(candidate):
  assert candidate(2, 3) == 5
  assert candidate(-1, 1) == 0
  assert candidate(10, 0) == 10
"""

# HumanEval-style problems (check(candidate) tests, canonical solutions).
PROBLEMS = [
  (
    "def has_close_elements(numbers, threshold):\n"
    "  for i, a in enumerate(numbers):\n"
    "    for j, b in enumerate(numbers):\n"
    "      if i != j and abs(a - b) < threshold:\n"
    "        return True\n"
    "  return False\n",
    "def check(candidate):\n"
    "  assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True\n"
    "  assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False\n"
    "  assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True\n"
    "  assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 0.5) == False\n",
  ),
  (
    "```python\n"
    "def is_palindrome(s):\n"
    "  return s == s[::-1]\n\n"
    "def make_palindrome(string):\n"
    "  for i in range(len(string) + 1):\n"
    "    if is_palindrome(string[i:]):\n"
    "      return string + string[:i][::-1]\n"
    "```",
    "ENTRY_POINT = 'make_palindrome'\n"
    "def check(candidate):\n"
    "  assert candidate('') == ''\n"
    "  assert candidate('cat') == 'catac'\n"
    "  assert candidate('jerry') == 'jerryrrej'\n",
  ),
  (
    "from typing import List\n"
    "def parse_nested_parens(paren_string: str) -> List[int]:\n"
    "  def depth(s):\n"
    "    d = m = 0\n"
    "    for c in s:\n"
    "      d += 1 if c == '(' else -1\n"
    "      m = max(m, d)\n"
    "    return m\n"
    "  return [depth(x) for x in paren_string.split() if x]\n",
    "def check(candidate):\n"
    "  assert candidate('(()()) ((())) () ((())()())') == [2, 3, 1, 3]\n"
    "  assert candidate('() (()) ((())) (((())))') == [1, 2, 3, 4]\n",
  ),
]


def _leftovers(run_id: str) -> list[int]:
  """Pids whose command line carries the run's tag."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
      continue
    if run_id.encode() in cmd:
      found.append(int(pid))
  return found


def _run(source, tests=CHECK_ADD, **kw):
  result = sandbox.run_tests(source, tests, **kw)
  time.sleep(0.05)
  assert _leftovers(result.run_id) == []
  return result


@pytest.mark.parametrize("source,tests", PROBLEMS)
def test_correct_humaneval_solutions_pass(source, tests):
  assert _run(source, tests).passed


def test_wrong_solution_and_assert_style_tests():
  good = "def add(a, b):\n  return a + b\n"
  assert not _run("def add(a, b):\n  return a - b\n").passed
  assert _run(good, "assert add(2, 2) == 4").passed
  assert not _run(good, "assert add(2, 2) == 5").passed
  assert _run(good, "print('noise')\nassert add(1, 1) == 2").passed


@pytest.mark.skipif(sandbox.containment() != "root", reason="needs root")
def test_root_grader_runs_candidate_as_nobody():
  src = "import os\ndef ids():\n  return [os.getuid(), os.geteuid()]\n"
  assert _run(src, f"assert ids() == [{sandbox.NOBODY}] * 2").passed


def test_infinite_loop_times_out_and_dies():
  result = _run("def add(a, b):\n  while True:\n    pass\n", timeout_s=1.5)
  assert result.status == "timeout" and not result.passed
  assert result.seconds < 3.0


def test_memory_hog_fails():
  hog = "def add(a, b):\n  x = bytearray(8 << 30)\n  return a + b\n"
  assert not _run(hog).passed
  grow = (
    "def add(a, b):\n  xs = []\n  while True:\n    xs.append(' ' * (1 << 24))\n"
  )
  assert not _run(grow, timeout_s=3).passed


def test_fork_bomb_and_daemon_children_die():
  bomb = (
    "import os, time\n"
    "def add(a, b):\n"
    "  if os.fork() == 0:\n"
    "    os.setsid()\n"
    "    time.sleep(1000)\n"
    "  while True:\n"
    "    os.fork()\n"
  )
  result = _run(bomb, timeout_s=2)
  assert not result.passed


def test_writes_outside_sandbox_leave_nothing():
  tag = secrets.token_hex(6)
  targets = [
    f"/tmp/escape_{tag}",
    f"/var/tmp/escape_{tag}",
    f"/dev/shm/escape_{tag}",
    f"{os.getcwd()}/escape_{tag}",
  ]
  src = (
    "def add(a, b):\n"
    f"  for p in {targets!r}:\n"
    "    open(p, 'w').write('x')\n"
    "  return a + b\n"
  )
  assert not _run(src).passed  # the repository is not writable
  tmp_only = src.replace(f"{targets!r}", f"{targets[:3]!r}")
  _run(tmp_only)  # may pass: the private tmpfs takes the writes
  for p in targets:
    assert not os.path.exists(p), p


def test_environment_is_not_visible(monkeypatch):
  monkeypatch.setenv("MULTIANS_SECRET", "s3cret")
  src = (
    "import os\n"
    "def secret():\n"
    "  v = os.environ.get('MULTIANS_SECRET')\n"
    "  for pid in os.listdir('/proc'):\n"
    "    try:\n"
    "      env = open(f'/proc/{pid}/environ', 'rb').read()\n"
    "    except Exception:\n"
    "      continue\n"
    "    if b's3cret' in env:\n"
    "      v = 's3cret'\n"
    "  return v\n"
  )
  assert not _run(src, "assert secret() == 's3cret'").passed


def test_early_exit_and_fake_success_fail():
  exits = "import os\nos._exit(0)\ndef add(a, b):\n  return 0\n"
  assert not _run(exits).passed
  in_call = "import sys\ndef add(a, b):\n  sys.exit(0)\n"
  assert not _run(in_call).passed
  fake = (
    "import os, sys\n"
    "for fd in range(0, 64):\n"
    "  try:\n"
    "    os.write(fd, b'passed OK 0' * 8)\n"
    "  except OSError:\n"
    "    pass\n"
    "print('passed')\n"
    "def add(a, b):\n  return None\n"
  )
  assert not _run(fake).passed


def test_rigged_equality_fails():
  src = (
    "class Any:\n"
    "  def __eq__(self, other):\n    return True\n"
    "def add(a, b):\n  return Any()\n"
  )
  assert not _run(src).passed


def test_network_is_blocked():
  with socket.socket() as srv:
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    src = (
      "import socket\n"
      "def reach():\n"
      f"  socket.create_connection(('127.0.0.1', {port}), timeout=1).close()\n"
      "  return True\n"
    )
    assert not _run(src, "assert reach() == True").passed


def test_code_matcher_in_score_texts():
  cfg = reward.RewardConfig(mode="multi_rlvr", num_answers=3, matcher="code")
  good = "def add(a, b):\n  return a + b"
  same = "def add(a, b):\n  # same code, other comment\n  return a + b"
  other = "def add(a, b):\n  return sum([a, b])"
  text = (
    f"<think>t</think><answer1>{good}</answer1><answer2>{same}</answer2>"
    f"<answer3>{other}</answer3>"
  )
  bad = text.replace("sum([a, b])", "a * b")
  out = reward.score_texts([text, bad], [[], []], cfg, [CHECK_ADD] * 2)
  assert out.correct.tolist() == [[1, 1, 1], [1, 1, 0]]
  assert out.num_correct.tolist() == [2, 1]  # equal ASTs count once
  assert out.distinct.tolist() == [0, 0]
  with pytest.raises(ValueError, match="no tests"):
    reward.score_texts([text], [[]], cfg, [None])
