"""Data tools: DICOM / NIfTI / PNG ingestion, lung masks, folds and sharded TFRecords."""
