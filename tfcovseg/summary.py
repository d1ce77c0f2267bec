"""``python -m tfcovseg.summary``: parameters and forward GFLOPs of a configured network.

Only the door: the command is `tfcovseg.cli.summary` (also the ``tfcovseg-summary``
console script; ``python -m tfcovseg.models.summary`` runs it too, after Keras loads), and
the library it calls is `tfcovseg.models.summary` (docs/architecture.md).
"""

if __name__ == "__main__":
    import sys

    from tfcovseg.cli.summary import main

    sys.exit(main())
