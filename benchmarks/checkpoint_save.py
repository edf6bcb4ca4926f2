"""The trainer's checkpoint save and the resume's check, on spawned gloo ranks (TP over all of
them), side by side in one run, on a Llama-style model after one RPG step (Adam state exists):

(a) the save as the trainer does it (Checkpointer.save: Megatron distributed checkpoint of the
    policy and the optimizer, every file fsynced and sha256-hashed, COMPLETE last)
(b) the resume's sha256 check with every rank hashing its share of the files (ours) vs
(c) rank 0 hashing every file while the others wait (how both were done before)

docs/scaling.md sizes the 70B recipe's signal margin from these rates.

  python benchmarks/checkpoint_save.py [--hidden 1024 --layers 8 --ranks 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def measure(args: argparse.Namespace, work: str) -> dict[str, float] | None:
    import torch.distributed as dist

    from megatron_rpg.checkpoint.train_state import verify
    from megatron_rpg.config import load_config
    from megatron_rpg.trainer import Trainer

    hf_config = Path(work) / "config.json"
    config = load_config(
        ROOT / "examples" / "tiny_cpu.yaml",
        [
            f"model.hf_config={hf_config}",
            f"parallel.tensor_parallel={args.ranks}",
            "sft.steps=0",
            "train_steps=1",
            f"logging.run_dir={work}/run",
        ],
    )
    trainer = Trainer(config)
    try:
        trainer.train_step()  # the optimizer's state exists from the first step on
        dist.barrier()
        start = time.perf_counter()
        directory = trainer.checkpointer.save(1)
        save_s = time.perf_counter() - start
        timings = {}
        for name, share in (
            ("shared", (dist.get_rank(), dist.get_world_size())),
            ("rank0", (0, 1)),
        ):
            dist.barrier()
            start = time.perf_counter()
            if name == "shared" or dist.get_rank() == 0:
                assert verify(directory, share) is None
            dist.barrier()  # the others wait for the slowest
            timings[name] = time.perf_counter() - start
    finally:
        trainer.close()
    if dist.get_rank() != 0:
        return None
    files = [p for p in directory.rglob("*") if p.is_file()]
    return {
        "bytes": float(sum(p.stat().st_size for p in files)),
        "files": float(len(files)),
        "parameters": float(sum(p.numel() for c in trainer.policy for p in c.parameters())),
        "save_s": save_s,
        "verify_shared_s": timings["shared"],
        "verify_rank0_s": timings["rank0"],
    }


def main() -> None:
    from megatron_rpg.parallel import RankPool

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    hf = json.loads((ROOT / "examples" / "tiny_model" / "config.json").read_text())
    hf.update(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=8,
    )
    work = tempfile.mkdtemp(prefix="mrpg_ckpt_bench_")
    try:
        (Path(work) / "config.json").write_text(json.dumps(hf))
        with RankPool(args.ranks, timeout_s=3600) as pool:
            r: dict[str, Any] = pool.run(measure, args, work)[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gb = r["bytes"] / 1e9
    print(
        f"model: hidden {args.hidden}, {args.layers} layers, {r['parameters'] / 1e6:.0f}M "
        f"parameters per rank (TP {args.ranks}); checkpoint {gb:.2f} GB in {r['files']:.0f} "
        f"files ({r['bytes'] / r['parameters'] / args.ranks:.1f} bytes per parameter)"
    )
    save, shared, rank0 = r["save_s"], r["verify_shared_s"], r["verify_rank0_s"]
    print(f"(a) save (write, fsync, sha256 in parallel) {save:7.2f} s  {gb / save:.2f} GB/s")
    print(f"(b) resume check, every rank its share     {shared:7.2f} s  {gb / shared:.2f} GB/s")
    print(f"(c) resume check, rank 0 alone             {rank0:7.2f} s  {gb / rank0:.2f} GB/s")
    print(f"(c) / (b) = {rank0 / shared:.2f}x")


if __name__ == "__main__":
    main()
