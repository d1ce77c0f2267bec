"""``tfcovseg-summary`` / ``python -m tfcovseg.summary``: parameters and GFLOPs of a
configured network (the library: `tfcovseg.models.summary`)."""

from __future__ import annotations

from tfcovseg import cli
from tfcovseg.configs.experiment import ConfigError, load_config


def build_parser():
    parser = cli.parser("summary", "Print parameters and forward GFLOPs of a network")
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
    return _print(config)


def _print(config) -> int:
    from tfcovseg.models.summary import summarize

    s = summarize(config)
    h, w = s["input_size"]
    print(f"experiment      {config.name}")
    print(f"architecture    {s['architecture']}")
    print(f"input           {h}x{w}x1 HU, {len(s['classes'])} classes: {', '.join(s['classes'])}")
    print(
        f"parameters      {s['parameters']:,} ({s['parameters'] / 1e6:.2f} M; "
        f"{s['trainable_parameters']:,} trainable)"
    )
    print(f"forward GFLOPs  {s['gflops']:.2f} per slice (2 FLOPs per multiply-accumulate)")
    for part, g in s["gflops_by_part"].items():
        print(f"  {part:<14}{g:8.2f}")
    return 0
