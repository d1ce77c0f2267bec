"""``python -m tfcovseg.predict``: segment a CT study with an exported model.

Only the door: the command is `tfcovseg.cli.predict` (also the ``tfcovseg-predict`` console
script), and the library it calls lives in the package's rooms (docs/architecture.md).
"""

if __name__ == "__main__":
    import sys

    from tfcovseg.cli.predict import main

    sys.exit(main())
