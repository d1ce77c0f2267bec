"""``python -m tfcovseg.compare``: compare runs and cross-validation folds.

Only the door: the command is `tfcovseg.cli.compare` (also the ``tfcovseg-compare`` console
script), and the library it calls lives in the package's rooms (docs/architecture.md).
"""

if __name__ == "__main__":
    import sys

    from tfcovseg.cli.compare import main

    sys.exit(main())
