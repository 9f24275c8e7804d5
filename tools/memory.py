r"""Per-device memory plan of a training config, before paying for devices.

Usage:
  python tools/memory.py --config=configs/qwen3_8b_multi_rlcr.py \
      --mesh=1,16,1 --device_gb=95
  python tools/memory.py --config=configs/tiny.py --num_devices=8 \
      --config.model.remat=full

The planner is ``multians_jax/aot/memory.py`` (its docstring says how each
figure is computed and how closely it matches the compiler's).
--config: an experiment config (``--config.x=y`` overrides); --mesh
replaces its mesh; --num_devices fills a -1 mesh axis; --device or
--device_gb sets the memory to compare with (default: the accelerator
named in the config's mesh comment). A config that names no accelerator
(``configs/demo.py``, ``configs/tiny.py``) is planned for where it runs,
this host: a -1 axis takes the local device count and the fit is judged
against the host's memory (both said in the report). --measure also
compiles the update step here and compares its temporaries with the
formula.
"""

import dataclasses
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from multians_jax import sharding
from multians_jax.aot import memory

# ---------------------------------------------------------------------------
# CLI

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config.")
_MESH = flags.DEFINE_string("mesh", None, "data,fsdp,tensor (one may be -1).")
_NDEV = flags.DEFINE_integer("num_devices", None, "Devices to fill a -1 axis.")
_DEVICE = flags.DEFINE_enum(
  "device", None, list(memory.DEVICE_GB), "Accelerator."
)
_GB = flags.DEFINE_float("device_gb", None, "Device memory in GiB.")
_MEASURE = flags.DEFINE_bool(
  "measure", False, "Also compile the update step here (small configs)."
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config=configs/NAME.py is required")
  mesh = None
  if _MESH.value:
    try:
      mesh = tuple(int(x) for x in _MESH.value.split(","))
    except ValueError:
      mesh = ()
    if len(mesh) != 3:
      raise app.UsageError(f"--mesh must be data,fsdp,tensor: {_MESH.value}")
  gb = _GB.value or (memory.DEVICE_GB[_DEVICE.value] if _DEVICE.value else None)
  fname = config_flags.get_config_filename(flags.FLAGS["config"])
  gb = gb or memory.device_gb_from_file(fname)
  ndev, here = _NDEV.value, gb is None  # no accelerator named: this host
  if here:
    gb = memory.host_memory_gb()
    ndev = ndev or jax.device_count()
    print(
      f"no accelerator named: planned for this host, {ndev} "
      f"{jax.devices()[0].platform} device(s) and {gb:.1f} GiB of memory"
    )
  try:
    plan = memory.plan_from_config(_CONFIG.value, mesh, ndev)
  except ValueError as e:  # a config error: its one-line message
    sys.exit(f"memory: {e}")
  print(memory.format_report(plan, gb))
  if _MEASURE.value:
    ma = memory.compiled_memory(plan)
    one = dataclasses.replace(plan, mesh=dict.fromkeys(sharding.MESH_AXES, 1))
    print(
      f"measured update step on {jax.devices()[0].platform} (one device): "
      f"temp {ma.temp_size_in_bytes / memory.GiB:.3f} GiB vs formula "
      f"{memory.update_temps(one) / memory.GiB:.3f} GiB (same shapes, one "
      "device)"
    )


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
