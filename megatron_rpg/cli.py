"""The `megatron-rpg` command: config, convert, train."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import yaml

from megatron_rpg.config import ConfigError, config_to_dict, load_config


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0


def _convert(args: argparse.Namespace) -> int:
    """Run a conversion on tp x pp ranks: directly under torchrun / srun (RANK set), else on
    spawned gloo ranks of this machine."""
    import os

    from megatron_rpg.checkpoint import convert

    actions: dict[str, Callable[[str, str, int, int, bool, bool], None]] = {
        "hf-to-mcore": convert.hf_to_mcore,
        "mcore-to-hf": convert.mcore_to_hf,
        "reshard": convert.reshard,
    }
    fn = actions[args.action]
    source = args.hf if args.action == "hf-to-mcore" else args.ckpt
    fn_args = (source, args.out, args.tp, args.pp, args.force, args.verify)
    if "RANK" in os.environ:
        from megatron_rpg.parallel import init_process_group

        init_process_group()
        fn(*fn_args)
    else:
        from megatron_rpg.parallel import RankError, run_on_ranks

        try:
            run_on_ranks(args.tp * args.pp, fn, *fn_args)
        except RankError as err:
            last = err.remote_traceback.strip().splitlines()[-1]
            sys.stderr.write(f"megatron-rpg convert: rank {err.rank}: {last}\n")
            return 1
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Validate the config (before any work), then train on tp x pp x dp ranks: directly under
    torchrun / srun (RANK set), else on spawned gloo ranks of this machine."""
    import os

    from megatron_rpg.trainer import run_training

    cfg = load_config(args.config, args.overrides)
    if "RANK" in os.environ:
        from megatron_rpg.parallel import init_process_group

        init_process_group(cfg.parallel.backend, cfg.parallel.timeout_minutes)
        run_training(cfg, args.resume)
        return 0
    from megatron_rpg.parallel import RankError, RankPool

    world = args.nproc or cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    try:
        with RankPool(world, timeout_s=cfg.parallel.timeout_minutes * 60.0) as pool:
            pool.run(run_training, cfg, args.resume)
    except RankError as err:
        sys.stderr.write(f"megatron-rpg train: rank {err.rank} failed:\n{err.remote_traceback}")
        return 1
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

    convert = commands.add_parser(
        "convert", help="HF <-> Megatron checkpoints at any TP x PP (writes atomically)"
    )
    convert.add_argument("action", choices=["hf-to-mcore", "mcore-to-hf", "reshard"])
    convert.add_argument("--hf", help="HF model directory (hf-to-mcore)")
    convert.add_argument("--ckpt", help="Megatron checkpoint directory (mcore-to-hf, reshard)")
    convert.add_argument("--out", required=True, help="output directory (must not exist)")
    convert.add_argument("--tp", type=int, default=1, help="tensor parallel size of the run")
    convert.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the run")
    convert.add_argument("--force", action="store_true", help="replace an existing --out")
    convert.add_argument(
        "--verify",
        action="store_true",
        help="after converting, compare logits with the transformers model (HF side)",
    )
    convert.set_defaults(func=_convert)

    train = commands.add_parser("train", help="RL training (RPG losses) from a YAML config")
    train.add_argument("--config", required=True, help="YAML file, e.g. examples/tiny_cpu.yaml")
    train.add_argument("overrides", nargs="*", help="key=value, e.g. loss.beta=0.001")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in logging.run_dir",
    )
    train.add_argument(
        "--nproc",
        type=int,
        default=0,
        help="ranks to spawn without torchrun (default: tp x pp; more adds DP)",
    )
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "convert":
        needed = "hf" if args.action == "hf-to-mcore" else "ckpt"
        if getattr(args, needed) is None:
            parser.error(f"convert {args.action} needs --{needed}")
        if args.verify and args.action == "reshard":
            parser.error("--verify compares with the HF side: hf-to-mcore or mcore-to-hf only")
    try:
        return int(args.func(args))
    except ConfigError as err:
        sys.stderr.write(f"megatron-rpg: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
