"""The `megatron-rpg` command: config, convert, train, eval, launch."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_rpg.config import ConfigError, config_yaml, load_config


def _config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(config_yaml(cfg))
    return 0


def _convert(args: argparse.Namespace) -> int:
    """GGUF import in this process; other conversions on tp x pp ranks: directly under torchrun /
    srun (RANK set), else on spawned gloo ranks of this machine."""
    import os

    from megatron_rpg.checkpoint import convert

    if args.action == "gguf-to-hf":
        from megatron_rpg.checkpoint.gguf import gguf_to_hf

        try:
            difference = gguf_to_hf(args.gguf, args.out, args.dtype, args.force, args.verify)
        except (ValueError, FileExistsError, FileNotFoundError) as err:
            sys.stderr.write(f"megatron-rpg convert: {err}\n")
            return 1
        if difference is not None:
            sys.stdout.write(
                f"verify: max |logits difference| vs the GGUF model = {difference:.3g}\n"
            )
        sys.stdout.write(f"wrote {args.out}\n")
        return 0
    actions: dict[str, Callable[[str, str, int, int, bool, bool, str], None]] = {
        "hf-to-mcore": convert.hf_to_mcore,
        "mcore-to-hf": convert.mcore_to_hf,
        "reshard": convert.reshard,
    }
    fn = actions[args.action]
    source = args.hf if args.action == "hf-to-mcore" else args.ckpt
    fn_args = (source, args.out, args.tp, args.pp, args.force, args.verify, args.layer_spec)
    if "RANK" in os.environ:
        from megatron_rpg.parallel import init_process_group

        init_process_group()
        fn(*fn_args)
    else:
        from megatron_rpg.parallel import RankError, run_on_ranks

        try:
            run_on_ranks(args.tp * args.pp, fn, *fn_args)
        except RankError as err:
            return _rank_failed("convert", err, Path(f"{args.out}.error.log"))
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


def _train(args: argparse.Namespace) -> int:
    """Validate the config (before any work), then train on tp x pp x dp ranks: directly under
    torchrun / srun (RANK set), else on spawned gloo ranks of this machine."""
    import contextlib
    import os
    import signal

    from megatron_rpg.run.preemption import StopSignals

    # under srun / torchrun: this process is a rank; a signal from here on is kept, not fatal
    stop = StopSignals() if "RANK" in os.environ else None

    from megatron_rpg.build import check_before_ranks
    from megatron_rpg.config import check_input_paths
    from megatron_rpg.run.resume_check import check_resume
    from megatron_rpg.run.run_dir import claimed_run_dir
    from megatron_rpg.trainer import run_training

    cfg = load_config(args.config, args.overrides)
    check_input_paths(cfg)
    layout = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    if args.nproc and args.nproc % layout:
        raise ConfigError(
            "--nproc",
            args.nproc,
            f"a multiple of parallel.tensor_parallel x pipeline_parallel ({layout})",
        )
    check_before_ranks(cfg, int(os.environ.get("WORLD_SIZE", 0)) or args.nproc or layout)
    resume = args.resume or cfg.checkpoint.resume
    claim: Any = contextlib.nullcontext()
    leader = os.environ.get("RANK", "0") == "0"  # the launcher, or rank 0 under torchrun / srun
    if leader:
        claim = claimed_run_dir(cfg.logging.run_dir, resume, args.overwrite)
    with claim:
        changes = check_resume(cfg.logging.run_dir, cfg) if resume else []
        for change in changes if leader else []:
            print(f"resume: {change}", flush=True)
        if "RANK" in os.environ:
            from megatron_rpg.parallel import init_process_group

            init_process_group(cfg.parallel.backend, cfg.parallel.timeout_minutes)
            run_training(cfg, resume, stop)
            return 0
        from megatron_rpg.parallel import RankError, RankPool

        try:
            timeout_s = cfg.parallel.timeout_minutes * 60.0
            with RankPool(args.nproc or layout, timeout_s=timeout_s) as pool:
                # SIGTERM (kill, a time limit) to this launcher: the ranks checkpoint and return
                previous = signal.signal(signal.SIGTERM, lambda *_: pool.signal(signal.SIGTERM))
                try:
                    pool.run(run_training, cfg, resume)
                finally:
                    signal.signal(signal.SIGTERM, previous)
        except RankError as err:
            return _rank_failed("train", err, Path(cfg.logging.run_dir) / "error.log")
    return 0


def _rank_failed(command: str, err: Any, log: Path) -> int:
    """One line for a rank's failure (exit 2 for a refused config, else 1); the full traceback
    is appended to `log`."""
    import time

    last = err.remote_traceback.strip().splitlines()[-1]
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as file:
            file.write(
                f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} rank {err.rank}\n"
                f"{err.remote_traceback}\n"
            )
        where = f" (traceback in {log})"
    except OSError as log_error:  # e.g. the disk is full: the terminal is the only place left
        sys.stderr.write(err.remote_traceback)
        where = f" (the traceback above: {log} not writable, {log_error.strerror})"
    sys.stderr.write(f"megatron-rpg {command}: rank {err.rank}: {last}{where}\n")
    return 2 if last.startswith(f"{ConfigError.__module__}.ConfigError") else 1


def _evaluate_on_rank(args: argparse.Namespace) -> str:
    """Build the engine from --hf or --ckpt, generate, grade; write JSON + Markdown; the table."""
    import json

    from megatron_rpg.evaluation import (
        benchmark_name,
        compare_to_markdown,
        evaluate,
        load_benchmark,
        to_markdown,
    )
    from megatron_rpg.rewards.sandbox import GraderPool
    from megatron_rpg.rollout import SamplingParams
    from megatron_rpg.rollout.build import checkpoint_engine
    from megatron_rpg.rollout.text import TextGenerator
    from megatron_rpg.tokenizer import load_tokenizer

    source = Path(args.hf or args.ckpt)
    if args.ckpt:
        from megatron_rpg.checkpoint.mcore import model_checkpoint

        source = model_checkpoint(source)  # a training checkpoint: its dist/
    if args.engine == "vllm" and not args.hf:
        raise ConfigError("--ckpt", args.ckpt, "--hf with --engine vllm (mcore-to-hf first)")
    engine = checkpoint_engine(
        source, bool(args.hf), args.engine, args.tensor_parallel, args.dtype, args.seed
    )
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    generate = TextGenerator(engine, load_tokenizer(source, args.chat_template), params)
    names = [n.strip() for n in args.benchmarks.split(",") if n.strip()]
    benchmarks = {
        benchmark_name(n): load_benchmark(n, args.data_dir)[: args.limit or None] for n in names
    }
    with GraderPool(workers=args.grader_workers, timeout_s=args.grader_timeout) as pool:
        results = evaluate(
            benchmarks, generate, args.k, pool, args.answer_extraction, args.prompt_template
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = to_markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table)
    if args.baseline:
        baseline = json.loads((Path(args.baseline) / "results.json").read_text())
        comparison = compare_to_markdown(baseline, results)
        (out / "comparison.md").write_text(comparison)
        table += f"\nagainst {args.baseline}:\n\n{comparison}"
    if args.manifest:
        from megatron_rpg.run.manifest import record_evaluation

        record_evaluation(args.manifest, out.name, {"source": str(source), "results": results})
    return table


def _eval(args: argparse.Namespace) -> int:
    from megatron_rpg.parallel import RankError, run_on_ranks

    try:
        (table,) = run_on_ranks(1, _evaluate_on_rank, args)
    except RankError as err:
        return _rank_failed("eval", err, Path(args.out) / "error.log")
    sys.stdout.write(table)
    sys.stdout.write(f"wrote {args.out}/results.json and results.md\n")
    return 0


def _launch(args: argparse.Namespace) -> int:
    """Print the layout and memory plan; refuse what cannot run; else submit the batch script."""
    import subprocess

    from megatron_rpg.config import check_input_paths
    from megatron_rpg.launch import memory_plan

    cfg = load_config(args.config, args.overrides)
    plan = memory_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_memory_gb)
    sys.stdout.write(plan.render() + "\n")
    plan.check()
    sys.stdout.write("plan: fits\n")
    if args.check_inputs or not args.dry_run:
        check_input_paths(cfg)  # the data, the initial checkpoint: before the job queues for days
    if args.dry_run:
        return 0
    if not args.script:
        sys.stderr.write("megatron-rpg launch: --script (a slurm/*.sh recipe) to submit\n")
        return 2
    command = [  # what runs is what was checked: this config file, one task per GPU
        "sbatch",
        f"--nodes={args.nodes}",
        f"--gpus-per-node={args.gpus_per_node}",
        f"--ntasks-per-node={args.gpus_per_node}",
        f"--export=ALL,CONFIG={Path(args.config).resolve()}",
        args.script,
        *args.overrides,
    ]
    return subprocess.run(command).returncode


def _tensor_parallel(text: str) -> int | str:
    """argparse type: an integer >= 1, or auto."""
    return text if text == "auto" else _positive_int(text)


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a rank count, a parallel size)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need an integer >= 1")
    return value


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
        "convert", help="GGUF -> HF, HF <-> Megatron at any TP x PP (writes atomically)"
    )
    convert.add_argument("action", choices=["gguf-to-hf", "hf-to-mcore", "mcore-to-hf", "reshard"])
    convert.add_argument("--gguf", help="GGUF file (gguf-to-hf; dequantized to --dtype)")
    convert.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="gguf-to-hf: dtype of the written weights",
    )
    convert.add_argument("--hf", help="HF model directory (hf-to-mcore)")
    convert.add_argument("--ckpt", help="Megatron checkpoint directory (mcore-to-hf, reshard)")
    convert.add_argument("--out", required=True, help="output directory (must not exist)")
    convert.add_argument("--tp", type=_positive_int, default=1, help="tensor parallel size")
    convert.add_argument("--pp", type=_positive_int, default=1, help="pipeline parallel size")
    convert.add_argument("--force", action="store_true", help="replace an existing --out")
    convert.add_argument(
        "--layer-spec",
        choices=["auto", "te", "local"],
        default="auto",
        help="the Megatron model's layer spec while converting (model.layer_spec; the checkpoint "
        "is the same under both)",
    )
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
        "--overwrite",
        action="store_true",
        help="delete the metrics and checkpoints of a run already in logging.run_dir first",
    )
    train.add_argument(
        "--nproc",
        type=_positive_int,
        default=0,
        help="ranks to spawn without torchrun (default: tp x pp; more adds DP)",
    )
    train.set_defaults(func=_train)

    from megatron_rpg.evaluation import BENCHMARKS, DATA_DIR

    evaluation = commands.add_parser(
        "eval", help="benchmark a model: mean@k, pass@k, maj@k with bootstrap intervals"
    )
    model = evaluation.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf", help="HF model directory (weights, config, tokenizer)")
    model.add_argument(
        "--ckpt",
        help="Megatron checkpoint (megatron-rpg convert, or a training "
        "checkpoint run/checkpoints/step_N)",
    )
    evaluation.add_argument(
        "--benchmarks",
        default="aime24,aime25,amc23,math500,gsm8k",
        help=f"comma-separated, of {','.join(BENCHMARKS)} or .jsonl files (problem, answer)",
    )
    evaluation.add_argument("--k", type=int, default=32, help="samples per problem")
    evaluation.add_argument("--out", required=True, help="directory for results.json/.md")
    evaluation.add_argument("--data-dir", default=str(DATA_DIR))
    evaluation.add_argument("--limit", type=int, default=0, help="first N problems per set")
    evaluation.add_argument("--temperature", type=float, default=1.0)
    evaluation.add_argument("--top-p", type=float, default=1.0)
    evaluation.add_argument("--max-tokens", type=int, default=8192)
    evaluation.add_argument("--seed", type=int, default=0)
    evaluation.add_argument("--engine", choices=["embedded", "vllm"], default="embedded")
    evaluation.add_argument(
        "--tensor-parallel",
        type=_tensor_parallel,
        default=1,
        help="vLLM's TP, or auto: the largest that fits the model's heads on this node's GPUs",
    )
    evaluation.add_argument(
        "--chat-template",
        choices=["auto", "on", "off"],
        default="auto",
        help="prompts as the chat template's user turn, as data.chat_template "
        "in training (auto: when the tokenizer has one)",
    )
    evaluation.add_argument(
        "--answer-extraction",
        choices=["strict", "last_number"],
        default="strict",
        help="last_number: a response stating no answer "
        "is read by its last number (as data.answer_extraction)",
    )
    evaluation.add_argument(
        "--prompt-template",
        choices=["dapo", "plain"],
        default="dapo",
        help="as data.prompt_template",
    )
    evaluation.add_argument(
        "--baseline", help="an earlier --out: also write comparison.md, before/after with intervals"
    )
    evaluation.add_argument(
        "--manifest",
        help="a run's manifest.json: record the results there under evaluations/<name of --out>",
    )
    evaluation.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="bfloat16",
        help="vLLM's weights (--engine vllm)",
    )
    evaluation.add_argument("--grader-workers", type=_positive_int, default=2)
    evaluation.add_argument("--grader-timeout", type=float, default=10.0)
    evaluation.set_defaults(func=_eval)

    launch = commands.add_parser(
        "launch", help="print the layout and per-GPU memory plan; refuse what cannot fit"
    )
    launch.add_argument("--config", required=True)
    launch.add_argument("overrides", nargs="*", help="key=value, e.g. parallel.pipeline_parallel=8")
    launch.add_argument("--nodes", type=_positive_int, required=True)
    launch.add_argument("--gpus-per-node", type=_positive_int, default=8)
    launch.add_argument("--gpu-memory-gb", type=float, default=80.0, help="80 for H100 80GB")
    launch.add_argument("--dry-run", action="store_true", help="check and print only")
    launch.add_argument(
        "--check-inputs",
        action="store_true",
        help="with --dry-run: also refuse missing input files (the recipes' in-job pre-flight)",
    )
    launch.add_argument("--script", help="batch script to submit with sbatch (slurm/*.sh)")
    launch.set_defaults(func=_launch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "convert":
        needed = {"gguf-to-hf": "gguf", "hf-to-mcore": "hf"}.get(args.action, "ckpt")
        if getattr(args, needed) is None:
            parser.error(f"convert {args.action} needs --{needed}")
        if args.verify and args.action == "reshard":
            parser.error("--verify compares with the HF side: hf-to-mcore or mcore-to-hf only")
    if args.command == "eval":
        refused = [
            (f"--{name.replace('_', '-')} {getattr(args, name)}", allowed)
            for name, ok, allowed in (
                ("k", args.k >= 1, ">= 1"),
                ("limit", args.limit >= 0, ">= 0 (0: all)"),
                ("max_tokens", args.max_tokens >= 1, ">= 1"),
                ("temperature", 0 <= args.temperature < float("inf"), "finite, >= 0"),
                (
                    "benchmarks",
                    any(n.strip() for n in args.benchmarks.split(",")),
                    "at least one name",
                ),
            )
            if not ok
        ]
        if refused:
            parser.error("; ".join(f"{given}: need {allowed}" for given, allowed in refused))
    try:
        return int(args.func(args))
    except ConfigError as err:
        sys.stderr.write(f"megatron-rpg: {err}\n")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
