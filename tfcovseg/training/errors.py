"""The error training stops with (`tfcovseg.training.trainer` and the modules it uses)."""


class TrainingError(Exception):
    """Training cannot start; the message names the problem (exit code 2)."""
