"""Training: the two phases (segmenter, then the classifier head on the frozen encoder),
losses, callbacks, run folders and resume, tf.distribute, semi-supervised training.

Uses `tfcovseg.models`, `tfcovseg.data`, `tfcovseg.evaluation` (metrics and rules) and
`tfcovseg.reporting`; never `tfcovseg.inference` or `tfcovseg.cli`.
"""
