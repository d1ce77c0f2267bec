"""Experiment configuration: per-component dataclasses, YAML loading with `--set`
overrides, and the built-in experiments found by name.
"""
