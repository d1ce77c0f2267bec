"""``tfcovseg-summary`` / ``python -m tfcovseg.models.summary``: parameters and GFLOPs of a
configured network (the library: `tfcovseg.models.summary`)."""

from __future__ import annotations

from tfcovseg import cli
from tfcovseg.configs.experiment import ConfigError, load_config


def build_parser():
    parser = cli.parser("models.summary", "Print parameters and forward GFLOPs of a network")
    parser.add_argument(
        "--config",
        help="experiment YAML file or built-in name, e.g. paper (default: the paper's settings)",
    )
    cli.add_set(parser, "e.g. --set model.input_size=[256,256]")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        return cli.fail(str(e))
    cli.quiet_libraries()
    from tfcovseg.models.summary import command

    return command(config)
