"""The language model.

``transformer`` (``ModelConfig``, ``Transformer``, the KV cache), its
``layers`` and ``attention`` backends (xla, cudnn, splash), ``lora``
adapters, the jitted ``sampler`` and the ``support`` (top-k / top-p) it
shares with the loss.
"""
