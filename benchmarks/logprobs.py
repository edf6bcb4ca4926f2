"""Log-probs of target tokens from hidden states, forward + backward, side by side:

  (a) naive:      logits = h @ W^T, log_softmax over the full vocabulary, gather
  (b) chunked:    logits = h @ W^T, then megatron_rpg.logprobs.vocab_parallel_logprobs
  (c) fused:      megatron_rpg.logprobs.fused_logprobs_loss, the training path: a token-separable
                  loss's gradients computed in the forward pass (3 matmuls per chunk)
  (d) fused-rc:   megatron_rpg.logprobs.fused_logprobs, any loss: backward recomputes the logits

The loss is sum_t u_t * log p(y_t) with random u. Time: best of --repeats, the methods interleaved
round by round in one process (so load drift hits all alike). Peak extra memory: each method in
a fresh subprocess (on the CPU the peak RSS, which only grows; on CUDA max_memory_allocated),
total and beyond the gradients of h and W that every method must hold. Ratios are to (a).
Single process (TP=1): the TP collectives are no-ops here.

    python benchmarks/logprobs.py                       # Qwen vocabulary, 4096 tokens, CPU
    python benchmarks/logprobs.py --device cuda --hidden 4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

METHODS = ("naive", "chunked", "fused", "fused-rc")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def setup(args: argparse.Namespace) -> tuple[dict[str, Callable[[], None]], list[torch.Tensor]]:
    from megatron_rpg.logprobs import fused_logprobs, fused_logprobs_loss, vocab_parallel_logprobs

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    hidden = (torch.randn(args.tokens, args.hidden, device=device) * 0.5).to(dtype)
    weight = (torch.randn(args.vocab, args.hidden, device=device) * 0.02).to(dtype)
    hidden.requires_grad_()
    weight.requires_grad_()
    targets = torch.randint(args.vocab, (args.tokens,), device=device)
    upstream = torch.randn(args.tokens, device=device)

    def naive() -> None:
        logits = hidden @ weight.t()
        lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        (lp * upstream).sum().backward()

    def chunked() -> None:
        (vocab_parallel_logprobs(hidden @ weight.t(), targets) * upstream).sum().backward()

    def fused() -> None:
        loss, _, _ = fused_logprobs_loss(
            hidden, weight, targets, lambda lp, ent, rows: upstream[rows] * lp
        )
        loss.backward()

    def fused_recompute() -> None:
        lp, _ = fused_logprobs(hidden, weight, targets)
        (lp * upstream).sum().backward()

    methods = {"naive": naive, "chunked": chunked, "fused": fused, "fused-rc": fused_recompute}
    return methods, [hidden, weight]


def _step(run: Callable[[], None], leaves: list[torch.Tensor], device: str) -> float:
    for leaf in leaves:
        leaf.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def memory_worker(args: argparse.Namespace) -> dict:
    methods, leaves = setup(args)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() if cuda else _rss_bytes()
    for _ in range(2):
        _step(methods[args.worker], leaves, args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_rss_bytes()
    grads = sum(leaf.numel() * leaf.element_size() for leaf in leaves)
    return {"peak_extra": peak - baseline, "grads": grads}


def timings(args: argparse.Namespace) -> dict[str, float]:
    methods, leaves = setup(args)
    best = dict.fromkeys(METHODS, float("inf"))
    for round_ in range(1 + args.repeats):  # round 0 warms up
        for name in METHODS:
            elapsed = _step(methods[name], leaves, args.device)
            if round_:
                best[name] = min(best[name], elapsed)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=512, help="4096 for Qwen-7B-like on GPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(memory_worker(args)))
        return

    print(
        f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} dtype={args.dtype} "
        f"device={args.device}; time: best of {args.repeats} interleaved rounds"
    )
    memory = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--worker", method] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "worker"
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory[method] = json.loads(out.strip().splitlines()[-1])
    times = timings(args)
    gib, base, base_t = 2**30, memory["naive"], times["naive"]
    base_beyond = base["peak_extra"] - base["grads"]
    print(
        f"{'method':9} {'time s':>8} {'x naive':>8} {'peak extra GiB':>15} {'x naive':>8} "
        f"{'beyond grads GiB':>17} {'x naive':>8}"
    )
    for method in METHODS:
        m, t = memory[method], times[method]
        beyond = m["peak_extra"] - m["grads"]
        print(
            f"{method:9} {t:8.3f} {t / base_t:8.2f} {m['peak_extra'] / gib:15.3f} "
            f"{m['peak_extra'] / base['peak_extra']:8.3f} {beyond / gib:17.3f} "
            f"{beyond / base_beyond:8.3f}"
        )
    fused = memory["fused"]
    print(
        f"target (c) fused: peak extra <= 0.10 x naive: "
        f"{fused['peak_extra'] / base['peak_extra']:.3f}; time <= 1.3 x naive: "
        f"{times['fused'] / base_t:.2f}"
    )


if __name__ == "__main__":
    main()
