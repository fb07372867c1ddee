"""Training throughput of `slm train` on one GPU: tokens/s, ms/step, MFU, peak memory.

Builds the model, optimizer and training step exactly as `slm train` does (`slm.train.Trainer`, timing
`Trainer.train_step`), feeds it synthetic tokens already on the GPU, warms up (torch.compile), then times.

    python benchmarks/train_throughput.py                       # the four reference settings of issue 5
    python benchmarks/train_throughput.py --config gpt_124m --batch 32 --set training.compile=false

MFU = (6·N + 12·L·H·Q·T) · tokens/s / peak, N = parameters without the position table, peak = the bf16
matmul rate this script measures on the same GPU (8192³ products).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from slm.config import load_config  # noqa: E402
from slm.model import GPT  # noqa: E402
from slm.train import Trainer  # noqa: E402

PRESETS = [  # (name, config, micro-batch) — the settings nanoGPT was measured at in issue 5
    ("30M ctx128 mb32", "seed30m", 32),
    ("30M ctx128 mb512", "seed30m", 512),
    ("124M ctx1024 mb16", "gpt_124m", 16),
    ("124M ctx1024 mb32", "gpt_124m", 32),
]


class SyntheticBatches:
    """Random token windows made once on the GPU: the benchmark measures the model, not the disk."""

    def __init__(self, batch: int, ctx: int, vocab: int, device, n: int = 8):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.data = [torch.randint(0, vocab, (batch, ctx + 1), generator=g).to(device) for _ in range(n)]

    def get_batch(self, step: int, micro: int = 0):
        w = self.data[(step * 7 + micro) % len(self.data)]
        return w[:, :-1], w[:, 1:]


def matmul_peak(device, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(model: GPT) -> float:
    c = model.config
    return 6 * model.count_parameters(non_embedding=True) + 12 * c.n_layers * c.n_heads * c.head_dim * c.context_length


def bench(config: str, batch: int, overrides: list[str], steps: int, warmup: int, peak: float) -> dict:
    cfg = load_config(config, [f"training.batch_size={batch}", "training.gradient_accumulation_steps=1",
                               "training.dtype=bfloat16", "training.compile=true", "model.dropout=0.0",
                               f"training.max_steps={steps + warmup}", "training.warmup_steps=1",
                               "training.out_dir=/tmp/slm-bench", *overrides])
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = 50257
    device = torch.device("cuda")
    torch._dynamo.reset()  # fresh compile caches: otherwise later settings hit dynamo's recompile limit and run eagerly
    torch.manual_seed(0)
    model = GPT(cfg.model)
    data = SyntheticBatches(batch, cfg.model.context_length, cfg.model.vocab_size, device)
    trainer = Trainer(model, data, data, cfg, device, progress=False)
    trainer.logger.enabled = False
    for _ in range(warmup):
        trainer.train_step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        loss, _, _ = trainer.train_step()
    loss.item()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    tokens_per_sec = trainer.tokens_per_step / dt
    return {"config": config, "micro_batch": batch, "overrides": overrides, "tokens_per_sec": tokens_per_sec,
            "ms_per_step": dt * 1000, "mfu": flops_per_token(model) * tokens_per_sec / peak,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": loss.item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="one config (file or built-in name) instead of the presets")
    p.add_argument("--batch", type=int, default=16, help="micro-batch with --config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak(torch.device("cuda"))
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | measured bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s")
    runs = [(f"{args.config} mb{args.batch}", args.config, args.batch)] if args.config else PRESETS
    results = []
    print(f"{'setting':22s} {'tokens/s':>12s} {'ms/step':>9s} {'MFU':>6s} {'peak GiB':>9s}")
    for name, config, batch in runs:
        r = bench(config, batch, args.set, args.steps, args.warmup, peak)
        r["name"] = name
        results.append(r)
        print(f"{name:22s} {r['tokens_per_sec']:12,.0f} {r['ms_per_step']:9.1f} {r['mfu']:6.1%} "
              f"{r['peak_mem_gib']:9.1f}", flush=True)
        torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "results": results}, indent=2))


if __name__ == "__main__":
    main()
