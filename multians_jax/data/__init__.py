"""Prompts and data.

The output formats and system ``prompts``, the dataset readers
(``datasets``) and the prompt ``pipeline`` (bucketing, sharding,
resumable order).
"""
