"""``python -m tfcovseg.serving_client``: query a model served by TF Serving.

Only the door: the command is `tfcovseg.cli.serving_client` (also the
``tfcovseg-serving-client`` console script), and the library it calls lives in the
package's rooms (docs/architecture.md).
"""

if __name__ == "__main__":
    import sys

    from tfcovseg.cli.serving_client import main

    sys.exit(main())
