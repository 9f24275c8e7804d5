"""run_tpu.sh: syntax, shellcheck, --dry-run commands, gcloud checks, help.

A fake ``gcloud`` (a shell script recording its argv) stands in for the real
CLI, so the tests also check that what ``--dry-run`` prints is exactly what
the script runs.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "run_tpu.sh"
BASH = shutil.which("bash")
COMMANDS = ("create", "setup", "launch", "logs", "stop", "delete", "status")
SEP = "\x1f"

V5P32 = ["--name", "rl", "--zone", "us-east5-a", "--project", "proj"]


def _run(*args, env=None, cwd=ROOT):
  full_env = dict(os.environ, **(env or {}))
  return subprocess.run(
    [BASH, str(SCRIPT), *args],
    capture_output=True,
    text=True,
    env=full_env,
    cwd=cwd,
    timeout=60,
  )


def _dry(*args):
  out = _run("--dry-run", *args)
  assert out.returncode == 0, out.stderr
  return out.stdout.splitlines()


@pytest.fixture
def fake_gcloud(tmp_path):
  """An authenticated fake gcloud; returns (env, read_calls)."""
  log = tmp_path / "calls"
  fake = tmp_path / "gcloud"
  fake.write_text(
    "#!/usr/bin/env bash\n"
    'if [ "$1 $2" = "auth list" ]; then echo me@example.com; exit 0; fi\n'
    f"printf '%s{SEP}' \"$@\" >> {shlex.quote(str(log))}\n"
    f"echo >> {shlex.quote(str(log))}\n"
  )
  fake.chmod(0o755)

  def calls():
    if not log.exists():
      return []
    return [line.split(SEP)[:-1] for line in log.read_text().splitlines()]

  env = {"GCLOUD": str(fake), "TMPDIR": str(tmp_path)}
  return env, calls


def test_bash_syntax():
  out = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True)
  assert out.returncode == 0, out.stderr


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="no shellcheck")
def test_shellcheck_clean():
  out = subprocess.run(
    ["shellcheck", str(SCRIPT)], capture_output=True, text=True
  )
  assert out.returncode == 0, out.stdout


def test_dry_run_create_v5p32():
  (line,) = _dry("create", *V5P32, "--accelerator-type", "v5p-32", "--spot")
  assert shlex.split(line) == [
    "gcloud", "compute", "tpus", "tpu-vm", "create", "rl",
    "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-32",
    "--version=v2-alpha-tpuv5", "--spot",
  ]  # fmt: skip


def test_dry_run_create_queued():
  (line,) = _dry(
    "create", *V5P32, "--queued", "--accelerator-type=v5p-32",
    "--version=v2-alpha-tpuv5", "--spot",
  )  # fmt: skip
  assert shlex.split(line) == [
    "gcloud", "compute", "tpus", "queued-resources", "create", "rl",
    "--node-id=rl", "--zone=us-east5-a", "--project=proj",
    "--accelerator-type=v5p-32", "--runtime-version=v2-alpha-tpuv5",
    "--spot",
  ]  # fmt: skip


def test_dry_run_setup_copies_tree_and_installs_on_all_workers():
  tar, scp, ssh = _dry("setup", *V5P32)
  assert "git ls-files" in tar and "tar " in tar
  scp = shlex.split(scp)
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert "rl:multians_src.tgz" in scp and "--worker=all" in scp
  ssh = shlex.split(ssh)
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rl"]
  assert "--worker=all" in ssh
  remote = ssh[-1].removeprefix("--command=")
  assert "tar -xzf multians_src.tgz -C multians_jax" in remote
  # Idempotent: the venv is created only when missing.
  assert "[ -x ~/multians_venv/bin/python ] || python3 -m venv" in remote
  assert "pip install -q -e '.[tpu]'" in remote


def test_dry_run_setup_from_git_url():
  (ssh,) = _dry("setup", *V5P32, "--repo-url", "https://h/x.git")
  remote = shlex.split(ssh)[-1]
  assert "git clone --depth=1 --branch main https://h/x.git multians_jax" in (
    remote
  )
  assert "if [ -d multians_jax/.git ]; then git -C multians_jax fetch" in (
    remote
  )


def test_dry_run_launch_all_workers_with_overrides():
  check, line = _dry(
    "launch", *V5P32, "--config", "qwen3_8b_multi_rlcr",
    "--workdir", "gs://bucket/runs/r1", "--config.rl.num_generations=32",
    "--accelerator-type", "v5p-32",
    "--", "--config.model.path=/data/my model",
  )  # fmt: skip
  # First the local compile check for the slice, with the same overrides.
  assert shlex.split(check) == [
    "python3", "tools/aot.py", "--config=configs/qwen3_8b_multi_rlcr.py",
    "--topology=v5p:2x2x4", "--config.rl.num_generations=32",
    "--config.model.path=/data/my model",
  ]  # fmt: skip
  argv = shlex.split(line)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rl"]
  assert "--worker=all" in argv and "--zone=us-east5-a" in argv
  remote = argv[-1].removeprefix("--command=")
  assert (
    "python -m multians_jax.main --config=configs/qwen3_8b_multi_rlcr.py "
    "--workdir=gs://bucket/runs/r1 --config.rl.num_generations=32 "
    "'--config.model.path=/data/my model'"
  ) in remote
  assert "nohup " in remote and "logs/train-$(hostname).log" in remote
  # The remote shell parses the overrides back into single words.
  words = shlex.split(remote.split("nohup env ")[1].split(" > ")[0])
  assert words[1:] == [
    "-m", "multians_jax.main", "--config=configs/qwen3_8b_multi_rlcr.py",
    "--workdir=gs://bucket/runs/r1", "--config.rl.num_generations=32",
    "--config.model.path=/data/my model",
  ]  # fmt: skip


@pytest.mark.parametrize(
  "args, message",
  [
    (("launch", "--workdir", "gs://b"), "--config"),
    (("launch", "--config", "tiny"), "--workdir"),
    (("launch", "--config=t", "--workdir=w", "--", "-x"), "--config.KEY"),
    (("create", "--zone"), "--zone needs a value"),
    (("frobnicate",), "unknown argument 'frobnicate'"),
    (("create", "delete"), "two commands"),
    ((), "no command"),
  ],
)
def test_bad_arguments(args, message):
  out = _run("--dry-run", *args)
  assert out.returncode != 0
  assert message in out.stderr


def test_missing_gcloud_is_a_clear_error(tmp_path):
  out = _run("create", env={"PATH": str(tmp_path)})
  assert out.returncode != 0
  assert "gcloud" in out.stderr and "not found" in out.stderr


def test_unauthenticated_gcloud_is_a_clear_error(tmp_path):
  fake = tmp_path / "gcloud"
  fake.write_text("#!/usr/bin/env bash\nexit 0\n")  # no active account
  fake.chmod(0o755)
  out = _run("create", env={"GCLOUD": str(fake)})
  assert out.returncode != 0
  assert "not authenticated" in out.stderr and "gcloud auth login" in (
    out.stderr
  )


def test_dry_run_needs_no_gcloud(tmp_path):
  out = _run("--dry-run", "delete", env={"PATH": str(tmp_path)})
  assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("cmd", ["create", "launch", "logs", "stop", "delete"])
def test_runs_exactly_what_dry_run_prints(cmd, fake_gcloud):
  env, calls = fake_gcloud
  args = {
    "create": ["--accelerator-type=v5p-32", "--spot"],
    "launch": [
      "--config",
      "tiny",
      "--workdir",
      "gs://b/r",
      "--config.a=1",
      "--no-check",
    ],  # fmt: skip
    "logs": ["--out", str(pathlib.Path(env["TMPDIR"]) / "logs")],
  }.get(cmd, [])
  printed = _dry(cmd, *V5P32, *args)
  out = _run(cmd, *V5P32, *args, env=env)
  assert out.returncode == 0, out.stderr
  gcloud_lines = [shlex.split(x) for x in printed if x.startswith("gcloud ")]
  assert [c[1:] for c in gcloud_lines] == calls()


@pytest.mark.parametrize(
  "accel, topology",
  [("v5p-32", "v5p:2x2x4"), ("v5p-8", "v5p:2x2x1"), ("v4-16", "v4:2x2x2"),
   ("v5litepod-16", "v5e:4x4"), ("v6e-64", "v6e:8x8")],
)  # fmt: skip
def test_compile_check_topology_per_slice(accel, topology):
  lines = _dry(
    "create", *V5P32, "--accelerator-type", accel, "--config", "tiny"
  )
  assert f"--topology={topology}" in shlex.split(lines[0])
  assert "create" in lines[1]


def test_compile_check_unknown_slice_is_a_clear_error():
  out = _run("--dry-run", "create", "--accelerator-type=v9-3", "--config=t")
  assert out.returncode != 0 and "--no-check" in out.stderr
  assert "no compile check for accelerator type 'v9-3'" in out.stderr
  ok = _run("--dry-run", "create", "--accelerator-type=v9-3", "--no-check")
  assert ok.returncode == 0, ok.stderr


def _fake_python(tmp_path, code):
  log = tmp_path / "python_calls"
  fake = tmp_path / "python"
  fake.write_text(
    "#!/usr/bin/env bash\n"
    f"printf '%s{SEP}' \"$@\" >> {shlex.quote(str(log))}\n"
    f"echo >> {shlex.quote(str(log))}\n"
    f"echo 'update needs 99 GiB per chip'; exit {code}\n"
  )
  fake.chmod(0o755)
  return str(fake), log


def test_launch_stops_when_the_compile_check_fails(fake_gcloud, tmp_path):
  env, calls = fake_gcloud
  python, log = _fake_python(tmp_path, 1)
  out = _run(
    "launch", *V5P32, "--accelerator-type=v5p-32", "--config", "tiny",
    "--workdir", "gs://b/r", env={**env, "PYTHON": python},
  )  # fmt: skip
  assert out.returncode == 1
  assert "compile check: the run does not compile or does not fit" in (
    out.stderr
  )
  assert "update needs 99 GiB per chip" in out.stdout
  assert calls() == []  # nothing was launched
  (argv,) = [ln.split(SEP)[:-1] for ln in log.read_text().splitlines()]
  assert argv[:3] == ["tools/aot.py", "--config=configs/tiny.py",
                      "--topology=v5p:2x2x4"]  # fmt: skip


def test_launch_reads_the_slice_type_from_gcloud(tmp_path):
  """Without --accelerator-type, launch checks against the type gcloud
  reports for the node, then launches."""
  log = tmp_path / "calls"
  fake = tmp_path / "gcloud"
  fake.write_text(
    "#!/usr/bin/env bash\n"
    'if [ "$1 $2" = "auth list" ]; then echo me@example.com; exit 0; fi\n'
    'if [ "$4" = "describe" ]; then echo v6e-16; exit 0; fi\n'
    f'echo "$4" >> {shlex.quote(str(log))}\n'
  )
  fake.chmod(0o755)
  python, plog = _fake_python(tmp_path, 0)
  out = _run(
    "launch", *V5P32, "--config", "tiny", "--workdir", "gs://b/r",
    env={"GCLOUD": str(fake), "PYTHON": python, "TMPDIR": str(tmp_path)},
  )  # fmt: skip
  assert out.returncode == 0, out.stderr
  assert "--topology=v6e:4x4" in plog.read_text()
  assert log.read_text().split() == ["ssh"]


def test_setup_ships_the_working_tree(fake_gcloud):
  env, calls = fake_gcloud
  out = _run("setup", *V5P32, env=env)
  assert out.returncode == 0, out.stderr
  tarball = pathlib.Path(env["TMPDIR"]) / "multians_src_rl.tgz"
  with tarfile.open(tarball) as tf:
    names = set(tf.getnames())
  assert {
    "run_tpu.sh",
    "setup.py",
    "multians_jax/model/transformer.py",
  } <= names
  assert not any(n.startswith(".git/") for n in names)
  scp, ssh = calls()
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
  assert scp[4] == str(tarball) and "--worker=all" in ssh


def test_help_lists_every_command():
  out = _run("--help")
  assert out.returncode == 0
  for cmd in COMMANDS:
    assert f"\n  {cmd} " in out.stdout
  for flag in ("--dry-run", "--accelerator-type", "--spot", "--queued",
               "--workdir", "--follow", "--repo-url"):  # fmt: skip
    assert flag in out.stdout


@pytest.mark.parametrize(
  "cmd, flag",
  [("create", "--accelerator-type"), ("launch", "--workdir"),
   ("logs", "--follow"), ("setup", "--repo-url")],
)  # fmt: skip
def test_command_help(cmd, flag):
  out = _run(cmd, "--help")
  assert out.returncode == 0
  assert out.stdout.lstrip().startswith(cmd) and flag in out.stdout
  others = set(COMMANDS) - {cmd}
  assert not any(f"\n  {o} " in out.stdout for o in others)
