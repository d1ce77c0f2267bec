"""The tf.data pipeline: TFRecords -> decode -> parse/augment -> batch (`dataset`), and the
intensity handling shared by training and inference (`intensity`).

``tfcovseg.data.make_dataset`` is the pipeline's entry point; it is resolved on first use so
that importing `tfcovseg.data.intensity` does not load TensorFlow.
"""


def __getattr__(name):
    if name == "make_dataset":
        from tfcovseg.data.dataset import make_dataset

        return make_dataset
    raise AttributeError(f"module 'tfcovseg.data' has no attribute {name!r}")
