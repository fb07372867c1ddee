"""Scaling over the GPUs of one host: slm's training step under torchrun, on 1 GPU and on N.

    python benchmarks/scaling.py --config gpt_124m --batch 32 --gpus 2                  # DDP
    python benchmarks/scaling.py --config gpt_124m --batch 32 --gpus 2 --accum 1 4       # + accumulation
    python benchmarks/scaling.py --gpus 2 --set training.parallelism=fsdp                # FSDP2

For each world size (1 and --gpus) and accumulation the script starts `torchrun --standalone
--nproc_per_node=N` on itself. Every rank builds the model, optimizer and training step exactly as
`slm train` does (`slm.train.Trainer`, wrapped in DDP or FSDP2 by `training.parallelism`) and trains on its
own random tokens, already on its GPU. Micro-batch and accumulation are per GPU, so N GPUs train an N times
larger global batch, as `slm train --gpus N` does. Rank 0 times three windows of steps and keeps the best
(the gradient all-reduce makes each step wait for the slowest rank).

Reported: tokens/s over all GPUs, ms/step, MFU per GPU against the bf16 matmul rate this script measures,
peak memory of rank 0, and scaling efficiency = tokens/s on N GPUs / (N x tokens/s on 1 GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import ROOT, SyntheticBatches, flops_per_token, matmul_peak, sync, time_steps  # noqa: E402

from slm.config import load_config  # noqa: E402  (train_throughput put src/ on the path)
from slm.model import GPT  # noqa: E402


def worker(spec: dict) -> None:
    """One rank: the Trainer's step on this rank's GPU, timed; rank 0 prints the result."""
    from slm.train import Trainer
    from slm.train.distributed import init_distributed, shutdown

    torch.backends.cuda.matmul.allow_tf32 = True
    dist = init_distributed(spec["device"])
    cfg = load_config(spec["config"], [
        f"training.batch_size={spec['batch']}", f"training.gradient_accumulation_steps={spec['accum']}",
        "training.dtype=bfloat16", "training.auto_batch_size=false", "model.dropout=0.0",
        "training.max_steps=100000", "training.warmup_steps=1", "training.out_dir=/tmp/slm-scaling",
        *spec["overrides"]])
    cfg.model.vocab_size = cfg.model.vocab_size or 50257
    torch.manual_seed(0)
    model = GPT(cfg.model)
    data = SyntheticBatches(spec["batch"], cfg.model.context_length, cfg.model.vocab_size, dist.device,
                            seed=dist.rank)  # each rank its own tokens
    trainer = Trainer(model, data, data, cfg, dist.device, progress=False, ctx=dist)
    trainer.logger.enabled = False
    step = lambda: trainer.train_step()[0]  # noqa: E731

    t0 = time.perf_counter()
    step().item()  # compiles
    compile_s = time.perf_counter() - t0
    for _ in range(spec["warmup"]):
        step()
    sync(spec["device"])  # this rank's GPU: init_distributed made it the current device
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    dt, spread, loss = time_steps(step, spec["steps"], spec["device"])
    if dist.is_main:
        peak_mem = torch.cuda.max_memory_allocated(dist.device) / 2**30 if dist.device.type == "cuda" else 0.0
        print("RESULT " + json.dumps({"tokens_per_sec": trainer.tokens_per_step / dt, "ms_per_step": dt * 1000,
                                      "tokens_per_step": trainer.tokens_per_step, "compile_s": compile_s,
                                      "spread": spread, "loss": loss.item(),
                                      "peak_mem_gib": peak_mem}), flush=True)
    shutdown(dist)


def launch(spec: dict, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec['gpus']}",
           __file__, "--worker", json.dumps(spec)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if spec["device"] == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**spec, **json.loads(line[7:])}
    tail = [line for line in (proc.stderr or proc.stdout).strip().splitlines() if "Error" in line][-2:]
    return {**spec, "error": " | ".join(tail) or f"exit code {proc.returncode}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt_124m", help="config file or built-in name (default gpt_124m)")
    p.add_argument("--batch", type=int, default=32, help="micro-batch per GPU")
    p.add_argument("--accum", type=int, nargs="+", default=[1], help="gradient accumulation step(s) per GPU")
    p.add_argument("--gpus", type=int, default=None, help="the larger world size (default: every GPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="slm config overrides")
    p.add_argument("--steps", type=int, default=10, help="steps per timed window (3 windows, best kept)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=int, default=600, help="seconds per torchrun job")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--device", default="cuda", help="cpu: a quick check with gloo (the tests use it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs CUDA GPUs (or --device cpu for a quick check with gloo)")
    gpus = args.gpus or (torch.cuda.device_count() if cuda else 2)
    if cuda and gpus > torch.cuda.device_count():
        raise SystemExit(f"error: --gpus {gpus} but this machine has {torch.cuda.device_count()} GPU(s)")
    peak = matmul_peak() if cuda else 1e12
    device_name = torch.cuda.get_device_name() if cuda else "CPU (gloo; peak taken as 1 TFLOP/s)"
    torch.cuda.empty_cache()
    print(f"{gpus} x {device_name} | torch {torch.__version__} | bf16 matmul peak {peak / 1e12:.0f} TFLOP/s | "
          f"{args.config} micro-batch {args.batch} {' '.join(args.set)} | {time.strftime('%Y-%m-%d')}", flush=True)
    fpt = flops_per_token(args.config, args.set)
    common = dict(config=args.config, batch=args.batch, overrides=args.set, steps=args.steps, warmup=args.warmup,
                  device=args.device)
    print(f"{'GPUs':>4s} {'accum':>5s} {'tokens/step':>11s} {'tokens/s':>11s} {'ms/step':>8s} {'MFU/GPU':>7s} "
          f"{'GiB':>5s} {'efficiency':>10s}", flush=True)
    results = []
    for accum in args.accum:
        single = None
        for n in sorted({1, gpus}):
            r = launch(dict(common, gpus=n, accum=accum), args.timeout)
            results.append(r)
            if "error" in r:
                print(f"{n:4d} {accum:5d} failed: {r['error'][:300]}", flush=True)
                continue
            r["mfu"] = fpt * r["tokens_per_sec"] / n / peak
            if n == 1:
                single = r["tokens_per_sec"]
            r["efficiency"] = r["tokens_per_sec"] / (n * single) if single else None
            eff = f"{r['efficiency']:.1%}" if r["efficiency"] else "-"
            print(f"{n:4d} {accum:5d} {r['tokens_per_step']:11,d} {r['tokens_per_sec']:11,.0f} {r['ms_per_step']:8.2f} "
                  f"{r['mfu']:7.1%} {r['peak_mem_gib']:5.1f} {eff:>10s}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": device_name, "gpus": gpus, "torch": torch.__version__,
                                               "peak_flops": peak, "results": results}, indent=2))


if __name__ == "__main__":
    main()
