"""tfcovseg: coarse-refine COVID-19 lesion segmentation for chest CT (Keras 3 / TensorFlow)."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
# The version, defined once in data_tools/__init__.py (read, not imported: nothing is
# installed yet when setup.py runs).
VERSION = re.search(
    r'^__version__ = "([^"]+)"', (HERE / "data_tools" / "__init__.py").read_text(), re.M
).group(1)

# TensorFlow is offered through extras so that users pick the wheel that fits their machine
# (the network, losses and metrics are pure Keras 3 and also run under JAX or PyTorch).
# tensorflow-cpu has wheels for x86-64 Linux and Windows only; elsewhere (macOS, ARM) the
# plain tensorflow wheel is the CPU build.
_CPU_WHEEL = (
    "(platform_machine == 'x86_64' or platform_machine == 'AMD64') and sys_platform != 'darwin'"
)
_OTHERS = (
    "(platform_machine != 'x86_64' and platform_machine != 'AMD64') or sys_platform == 'darwin'"
)
TF_CPU = [f"tensorflow-cpu>=2.16; {_CPU_WHEEL}", f"tensorflow>=2.16; {_OTHERS}"]
TF_CPU.append("tensorboard>=2.16")  # the TensorBoard callback; TF no longer pulls it in
TF_GPU = ["tensorflow[and-cuda]>=2.16", "tensorboard>=2.16"]
CODECS = ["pylibjpeg>=2.0", "pylibjpeg-libjpeg>=2.1", "pylibjpeg-openjpeg>=2.3"]
# gRPC client of TF Serving (tfcovseg.serving_client). It declares the full tensorflow wheel
# as a dependency: with the gpu extra that is already there; next to tensorflow-cpu install
# it with `pip install --no-deps tensorflow-serving-api` instead of this extra.
SERVING = ["tensorflow-serving-api>=2.16", "grpcio>=1.24"]
# python -m tfcovseg.export --format onnx (tf2onnx traces the serving graph; onnxruntime
# runs it: the test compares it with the SavedModel).
ONNX = ["tf2onnx>=1.16", "onnx>=1.14", "onnxruntime>=1.16"]
# data_tools.convert --runner and tfcovseg.predict --runner (Apache Beam pipelines; for
# Dataflow also "apache-beam[gcp]").
BEAM = ["apache-beam>=2.60"]

setup(
    name="tfcovseg",
    version=VERSION,
    description=(
        "Coarse-refine segmentation of COVID-19 lesions in chest CT "
        "(Huang et al., IET Image Processing 2021) in Keras 3 / TensorFlow. "
        "Research use, not a medical device."
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tfcovseg", "tfcovseg.*", "data_tools", "data_tools.*"]),
    # The built-in experiments (python -m tfcovseg.train --config paper), found next to
    # tfcovseg/configs/experiment.py in an installed wheel as in the source tree.
    package_data={"tfcovseg": ["configs/experiments/*.yaml"]},
    entry_points={
        "console_scripts": [
            "tfcovseg-train = tfcovseg.cli.train:main",
            "tfcovseg-evaluate = tfcovseg.cli.evaluate:main",
            "tfcovseg-export = tfcovseg.cli.export:main",
            "tfcovseg-predict = tfcovseg.cli.predict:main",
            "tfcovseg-summary = tfcovseg.cli.summary:main",
            "tfcovseg-compare = tfcovseg.cli.compare:main",
            "tfcovseg-serving-client = tfcovseg.cli.serving_client:main",
            "tfcovseg-semiseg-benchmark = tfcovseg.cli.semiseg:main",
            "tfcovseg-convert = data_tools.convert:run",
            "tfcovseg-phantom = data_tools.phantom.cohort:main",
        ]
    },
    install_requires=[
        "keras>=3.5",
        "numpy>=1.26",
        "scipy>=1.10",
        "threadpoolctl>=3.1",
        "pydicom>=2.4",
        "nibabel>=5.0",
        "matplotlib>=3.7",
        "pyyaml>=6.0",
        "pillow>=10.1",  # ImageFont.load_default(size=...) for the montages
        "highdicom>=0.22",
        # Anti-aliased drawing (partial volume at every edge) and fast blurs for the phantom.
        "opencv-python-headless>=4.8",
        # The converter writes tf.train.Examples and TFRecord shards without TensorFlow (its
        # workers): google-crc32c checksums the records; threadpoolctl keeps each worker's
        # BLAS on one thread.
        "google-crc32c>=1.5",
        # 3-D connected components of the lung masks: 4x faster than scipy.ndimage.label,
        # and a converter worker starts without scipy.ndimage (0.2 s of its imports).
        "connected-components-3d>=3.12",
    ],
    extras_require={
        "cpu": TF_CPU,
        "gpu": TF_GPU,
        "codecs": CODECS,
        "serving": SERVING,
        "onnx": ONNX,
        "beam": BEAM,
        "test": [
            "pytest>=7.0",
            "pytest-xdist>=3.5",  # the suite runs on every core (pytest.ini: -n auto)
            "jax[cpu]>=0.4.30",
            "pydicom-data",
            "ruff>=0.5",
            *TF_CPU,
            *CODECS,
            *ONNX,
            *BEAM,
        ],
    },
)
