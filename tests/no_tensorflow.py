"""Importing this module makes `import tensorflow` fail, as on a machine without it.

Used by subprocess tests to prove which parts of tfcovseg run without TensorFlow (for
example on an accelerator machine that only has JAX).
"""

import sys


class _BlockTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, _BlockTensorFlow())
