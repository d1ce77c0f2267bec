"""Data tools: DICOM / NIfTI / PNG ingestion, lung masks, folds and sharded TFRecords."""

# The distribution's version, defined once: setup.py reads it from here, tfcovseg imports it,
# and every command answers it to --version.
__version__ = "0.1.0"
