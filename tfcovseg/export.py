"""``python -m tfcovseg.export``: export a run as a SavedModel for TF Serving.

Only the door: the command is `tfcovseg.cli.export` (also the ``tfcovseg-export`` console
script), and the library it calls lives in the package's rooms (docs/architecture.md).
"""

if __name__ == "__main__":
    import sys

    from tfcovseg.cli.export import main

    sys.exit(main())
