"""``python -m tfcovseg.train``: train the coarse-refine network.

Only the door: the command is `tfcovseg.cli.train` (also the ``tfcovseg-train`` console
script), and the library it calls lives in the package's rooms (docs/architecture.md).
"""

if __name__ == "__main__":
    import sys

    from tfcovseg.cli.train import main

    sys.exit(main())
