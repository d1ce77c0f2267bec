"""Evaluation: metrics, the lesion-burden and slice-score rules, patient rules and
verdicts, severity, the Inf-Net protocol, comparison tables and the evaluation of a run.

Uses `tfcovseg.models` and `tfcovseg.data`; never training, inference, reporting or cli.
"""
