"""The `megatron-rpg` command; subcommands arrive with their parts (train, convert, eval...)."""

from __future__ import annotations

import argparse
import sys

import yaml

from megatron_rpg.config import ConfigError, config_to_dict, load_config


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-rpg",
        description="RL post-training with Regularized Policy Gradient losses on Megatron-Core.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser(
        "config", help="validate a run config (YAML + key=value overrides) and print it resolved"
    )
    config.add_argument("--config", default=None, help="YAML file; defaults if omitted")
    config.add_argument("overrides", nargs="*", help="key=value, e.g. loss.beta=0.001")
    config.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as err:
        sys.stderr.write(f"megatron-rpg: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
