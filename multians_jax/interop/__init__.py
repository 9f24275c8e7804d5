"""Model formats in and out.

Hugging Face checkpoints and configs (``hf``, ``hf_config``), GGUF
files (``gguf``) and the safetensors reader and writer (``tensorfile``).
"""
