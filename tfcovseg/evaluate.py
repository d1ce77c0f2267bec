"""``python -m tfcovseg.evaluate``: evaluate a training run.

Only the door: the command is `tfcovseg.cli.evaluate` (also the ``tfcovseg-evaluate`` console
script), and the library it calls lives in the package's rooms (docs/architecture.md).
"""

if __name__ == "__main__":
    import sys

    from tfcovseg.cli.evaluate import main

    sys.exit(main())
