r"""Entry point: ``python -m multians_jax.main --config=FILE --workdir=DIR``.

  python -m multians_jax.main --config=configs/demo.py --workdir=runs/demo \
      --config.steps=20 --config.optim.lr=2e-5

Also installed as ``multians-train``. An existing WORKDIR resumes from its
latest complete checkpoint. Multi-process runs call
``jax.distributed.initialize()`` (automatic on Cloud TPU; on GPU clusters
or for a local simulation pass --coordinator, --num_processes and
--process_id, or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID).
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (or gs://).")
_COORD = flags.DEFINE_string("coordinator", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
  """``jax.distributed.initialize`` for multi-process jobs, else nothing."""
  import jax

  env = os.environ
  coord = _COORD.value or env.get("JAX_COORDINATOR_ADDRESS")
  nproc = _NPROC.value or int(env.get("JAX_NUM_PROCESSES", "0") or 0)
  pid = _PID.value if _PID.value is not None else env.get("JAX_PROCESS_ID")
  if coord and nproc and nproc > 1:
    if pid is None:
      raise ValueError("--process_id (or JAX_PROCESS_ID) is required")
    # Cross-process collectives of the CPU backend (local simulation, CPU
    # clusters); no effect on accelerators. Must precede initialize().
    if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coord, num_processes=nproc, process_id=int(pid))
  elif env.get("TPU_WORKER_HOSTNAMES") or env.get("CLOUD_TPU_TASK_ID"):
    jax.distributed.initialize()


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax, TFDS chatty at INFO
    logging.set_verbosity(logging.WARNING)
  init_distributed()
  from multians_jax import config, hostmem, loop

  cfg = _CONFIG.value
  try:
    run = config.RunConfig.from_dict(cfg.to_dict())
  except ValueError as e:  # a config error ends the run with its message
    sys.exit(f"main: {e}")
  workdir = _WORKDIR.value
  import jax

  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(cfg.to_dict(), f, indent=2, default=str)
  hostmem.release_after_compiles()  # the compiler's freed memory
  try:
    result = loop.train(run, workdir)
  except ValueError as e:  # found at set-up: the mesh, adapters, data
    if not str(e).startswith("config:"):
      raise
    sys.exit(f"main: {e}")
  logging.info("done: %s", json.dumps(result.get("final", result), default=str))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
