"""Training throughput on one GPU: slm next to nanoGPT, same settings, same run.

slm's side builds the model, optimizer and training step exactly as `slm train` does (`slm.train.Trainer`,
timing `Trainer.train_step`). nanoGPT's side imports `model.py` from a nanoGPT checkout you point it at
(`git clone https://github.com/karpathy/nanoGPT`) and runs the inner loop of its `train.py` (bf16 autocast,
torch.compile, fused AdamW, gradient clipping), without its per-step `loss.item()` so it is not held back.
Both train on random tokens already on the GPU (`--data disk`: slm reads them from a memory-mapped shard
through its loader instead, to show the loader keeps up).

    python benchmarks/train_throughput.py --nanogpt ~/nanoGPT            # issue 5's settings, both sides
    python benchmarks/train_throughput.py --levers                       # slm with each speed lever off in turn
    python benchmarks/train_throughput.py --config gpt_124m --batch 32 --set training.attention=cudnn

Every setting runs in its own process (fresh compile caches, its own memory). With --jobs N, N processes
compile at once; then they are timed one at a time, each with the GPU and the CPU to itself (compiling
runs autotuning kernels on the GPU and keeps the CPU busy, so no setting compiles while one is timed; a
setting waits at most --quiet-wait seconds for that, else its row says it was timed during a compile).
Reported: tokens/s, ms/step, MFU = (6·N + 12·L·H·Q·T) · tokens/s / peak, with N = parameters without the
position table (the same FLOPs/token for both sides) and peak = the bf16 matmul rate this script measures
(8192³ products), and peak GPU memory.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from slm.config import load_config  # noqa: E402
from slm.model import GPT  # noqa: E402
from slm.plan import meta_model  # noqa: E402

LOCK = Path("/tmp/slm-bench-gpu.lock")
STATE = Path("/tmp/slm-bench-state")  # phase markers of the worker processes (shared by concurrent runs)

# (name, config, micro-batch): the settings nanoGPT was measured at in issue 5, plus larger micro-batches
PRESETS = [
    ("30M ctx128", "seed30m", 32),
    ("30M ctx128", "seed30m", 512),
    ("30M ctx128", "seed30m", 1024),
    ("124M ctx1024", "gpt_124m", 16),
    ("124M ctx1024", "gpt_124m", 32),
]

# Each lever and the override that turns it off (measured against the config's own settings).
LEVERS = {
    "torch.compile": "training.compile=false",
    "compile mode": "training.compile_mode=default",
    "short-context attention kernel": "training.attention=sdpa",
    "fused loss (loss_chunk)": "training.loss_chunk=0",
    "vocab padded to 64": "model.vocab_multiple=1",
    "fused AdamW": "training.fused_optimizer=false",
    "FP8 matmuls": "training.fp8=none",
    "bf16 residual stream": "training.bf16_residual=false",
}


# ----------------------------------------------------------------------------------------------- worker side

@contextmanager
def gpu_lock():
    LOCK.touch(exist_ok=True)
    with open(LOCK) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# Phases of the worker processes, as marker files "<phase>-<pid>" in the run's state folder:
# "compiling" while a setting compiles, "queued" from then until its timed steps are done. A setting is
# timed only when no other one is compiling, and none starts compiling while compiled ones wait.
def others(state: Path, phase: str) -> bool:
    """Whether another live process is in ``phase`` (markers of dead processes are cleared)."""
    busy = False
    for marker in state.glob(f"{phase}-*"):
        pid = int(marker.name.rsplit("-", 1)[1])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            busy = True
        except ProcessLookupError:
            marker.unlink(missing_ok=True)
    return busy


def mark(state: Path, phase: str, on: bool = True) -> None:
    marker = state / f"{phase}-{os.getpid()}"
    marker.touch() if on else marker.unlink(missing_ok=True)


def wait_while(state: Path, phase: str, limit: float = float("inf")) -> bool:
    """Wait until no other process is in ``phase``, at most ``limit`` seconds; whether that happened."""
    end = time.monotonic() + limit
    while others(state, phase):
        if time.monotonic() > end:
            return False
        time.sleep(0.2)
    return True


class SyntheticBatches:
    """Random token windows made once on the GPU: the benchmark measures the model, not the disk."""

    def __init__(self, batch: int, ctx: int, vocab: int, device, n: int = 8, seed: int = 0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        windows = [torch.randint(0, vocab, (batch, ctx + 1), generator=g) for _ in range(n)]
        self.data = [(w[:, :-1].contiguous().to(device), w[:, 1:].contiguous().to(device)) for w in windows]

    def get_batch(self, step: int, micro: int = 0):
        return self.data[(step * 7 + micro) % len(self.data)]


def disk_batches(batch: int, ctx: int, vocab: int, device, seed: int):
    """slm's own loader over a memory-mapped shard of 200M random tokens (written once to /tmp)."""
    import numpy as np

    from slm.data.loader import BatchLoader

    folder = Path("/tmp/slm-bench-data")
    n = 200_000_000
    if not (folder / "meta.json").exists():
        folder.mkdir(exist_ok=True)
        tokens = np.random.default_rng(0).integers(0, vocab, n, dtype=np.uint16)
        for split in ("train", "val"):
            tokens.tofile(folder / f"{split}.bin")
        meta = {"tokenizer": "gpt2", "vocab_size": vocab, "dtype": "uint16", "train_tokens": n, "val_tokens": n}
        (folder / "meta.json").write_text(json.dumps(meta))
    return BatchLoader(folder, "train", batch, ctx, device, seed, vocab_size=vocab)


def lever_is_on(config: str, overrides: list[str], off: str) -> bool:
    """Whether ``config`` (with ``overrides``) differs from the lever's ``off`` setting, e.g. training.fp8=none."""
    section, name = off.split("=", 1)[0].split(".")
    current, lever_off = (load_config(config, o).to_dict()[section][name] for o in (overrides, [*overrides, off]))
    return current != lever_off


def flops_per_token(config: str, overrides: list[str]) -> int:
    cfg = load_config(config, overrides)
    cfg.model.vocab_size = cfg.model.vocab_size or 50257
    return meta_model(cfg.model).flops_per_token()


def slm_stepper(spec: dict):
    from slm.train import Trainer

    cfg = load_config(spec["config"], [
        f"training.batch_size={spec['batch']}", "training.gradient_accumulation_steps=1", "training.dtype=bfloat16",
        "model.dropout=0.0", "training.max_steps=100000", "training.warmup_steps=1", "training.out_dir=/tmp/slm-bench",
        *spec["overrides"]])
    cfg.model.vocab_size = cfg.model.vocab_size or 50257
    device = torch.device(spec["device"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    ctx, vocab = cfg.model.context_length, cfg.model.vocab_size
    if spec["data"] == "disk":
        data = disk_batches(spec["batch"], ctx, vocab, device, cfg.training.seed)
    else:
        data = SyntheticBatches(spec["batch"], ctx, vocab, device)
    trainer = Trainer(model, data, data, cfg, device, progress=False)
    trainer.logger.enabled = False

    def step():
        return trainer.train_step()[0]

    step.cuda_graphs = trainer.cuda_graphs  # its memory sits in pools filled while recording (see run_worker)
    return step, trainer.tokens_per_step


def nanogpt_stepper(spec: dict):
    """The inner loop of nanoGPT's train.py, as it runs with dtype=bfloat16 and compile=True."""
    sys.path.insert(0, spec["nanogpt"])
    from model import GPT as NanoGPT  # nanoGPT's model.py
    from model import GPTConfig as NanoConfig

    c = load_config(spec["config"], spec["overrides"]).model
    vocab = c.vocab_size or 50257
    conf = NanoConfig(block_size=c.context_length, vocab_size=-(-vocab // 64) * 64, n_layer=c.n_layers,
                      n_head=c.n_heads, n_embd=c.d_model, dropout=0.0, bias=c.bias)  # GPT-2: nanoGPT's 50304
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    model = NanoGPT(conf).to(device)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)  # fused AdamW on CUDA
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # as train.py: only for float16
    if device.type == "cuda":
        model = torch.compile(model)
    data = SyntheticBatches(spec["batch"], c.context_length, vocab, device)
    precision = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    state = {"step": 0}

    def step():
        for group in optimizer.param_groups:
            group["lr"] = 6e-4
        x, y = data.get_batch(state["step"])
        with precision:
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        return loss

    return step, spec["batch"] * c.context_length


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(step, steps: int, device: str) -> tuple[float, float, torch.Tensor]:
    """Three timed windows of ``steps`` steps: (seconds per step in the best window, how much slower the
    worst one was, the last loss). The best window is the least disturbed."""
    windows = []
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        sync(device)
        windows.append((time.perf_counter() - t) / steps)
    return min(windows), max(windows) / min(windows) - 1, loss


def profile(step, spec: dict) -> None:
    """Append the GPU time per kernel of 3 steps to the file spec["profile"] (where the step's time goes);
    the timeline of those steps goes next to it as a Chrome trace (open it in https://ui.perfetto.dev)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        sync(spec["device"])
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=100)
    with open(spec["profile"], "a") as f:
        f.write(f"\n=== {spec['name']} mb{spec['batch']} {spec['side']} {' '.join(spec['overrides'])} (3 steps)\n")
        f.write(table)
    tag = "-".join([spec["name"], f"mb{spec['batch']}", spec["side"], *spec["overrides"]])
    prof.export_chrome_trace(f"{spec['profile']}.{re.sub(r'[^A-Za-z0-9_.-]+', '_', tag)}.json")


def run_worker(spec: dict) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    state = Path(spec["state"])
    cuda = spec["device"].startswith("cuda")
    exclusive = spec.get("exclusive", False)  # a retry after running out of memory next to other settings, run
    with gpu_lock() if exclusive else nullcontext():  # once all others are done: it holds the GPU, compile included
        mark(state, "compiling")
        while not exclusive and others(state, "queued"):  # compiled settings wait to be timed: let them go first
            mark(state, "compiling", False)
            wait_while(state, "queued")
            mark(state, "compiling")
        step, tokens_per_step = (nanogpt_stepper if spec["side"] == "nanoGPT" else slm_stepper)(spec)
        t0 = time.perf_counter()
        step().item()  # compiles
        compile_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()  # hold only the model and optimizer while waiting for the GPU
        mark(state, "queued")
        mark(state, "compiling", False)
        with nullcontext() if exclusive else gpu_lock():
            # a slow compile (max-autotune can take many minutes) must not hold everyone up for ever
            quiet = wait_while(state, "compiling", spec["quiet_wait"])
            for _ in range(spec["warmup"]):
                step()
            sync(spec["device"])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            dt, spread, loss = time_steps(step, spec["steps"], spec["device"])
            if spec.get("profile"):
                profile(step, spec)
            mark(state, "queued", False)
    return {"tokens_per_sec": tokens_per_step / dt, "ms_per_step": dt * 1000, "compile_s": compile_s,
            "spread": spread, "quiet": quiet, "loss": loss.item(),
            "peak_mem_gib": peak_memory(getattr(step, "cuda_graphs", False)) / 2**30 if cuda else 0.0}


def peak_memory(cuda_graphs: bool) -> int:
    """Bytes at the peak of the timed steps. CUDA graphs (compile_mode reduce-overhead) keep their tensors in
    memory pools taken while recording, before the peak was reset: for them, the bytes the allocator holds."""
    peak = torch.cuda.max_memory_allocated()
    return max(peak, torch.cuda.memory_reserved()) if cuda_graphs else peak


# ----------------------------------------------------------------------------------------------- parent side

def matmul_peak(n: int = 8192, reps: int = 50) -> float:
    """bf16 matmul rate of this GPU, FLOP/s (random data: zeros run faster)."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    with gpu_lock():
        for _ in range(5):
            a @ b
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def launch(spec: dict, timeout: int, threads: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {**spec, **json.loads(line[7:])}
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    # the exception first (a traceback ends with it), then where it was raised
    error = " | ".join([*lines[-1:], *lines[-3:-1]]) or f"exit code {proc.returncode}"
    return {**spec, "error": error, "oom": "out of memory" in proc.stderr.lower()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="one config (file or built-in name) instead of the presets")
    p.add_argument("--batch", type=int, nargs="+", default=[16], help="micro-batch(es) with --config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="slm config overrides")
    p.add_argument("--nanogpt", help="a nanoGPT checkout (holding model.py): measure it side by side")
    p.add_argument("--levers", action="store_true", help="also run slm with each speed lever turned off")
    p.add_argument("--variant", action="append", default=[], metavar="K=V[,K=V]",
                   help="also run slm with these overrides (repeatable)")
    p.add_argument("--data", choices=["synthetic", "disk"], default="synthetic")
    p.add_argument("--only", help="run only settings whose name contains this (e.g. 124M)")
    p.add_argument("--steps", type=int, default=20, help="steps per timed window (3 windows, best kept)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1, help="settings compiling at once (timing is always one at a time)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per setting")
    p.add_argument("--quiet-wait", type=float, default=120,
                   help="most seconds a compiled setting waits for others to finish compiling before it is timed")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--profile", metavar="FILE",
                   help="append a per-kernel GPU time table of every setting here (and a Chrome trace next to it)")
    p.add_argument("--device", default="cuda", help="cpu: a quick check that the script runs (the tests use it)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: this benchmark needs a CUDA GPU (or --device cpu for a quick check)")

    presets = [(f"{args.config}", args.config, b) for b in args.batch] if args.config else PRESETS
    presets = [pr for pr in presets if not args.only or args.only in pr[0]]
    common = dict(steps=args.steps, warmup=args.warmup, data=args.data, nanogpt=args.nanogpt, device=args.device,
                  quiet_wait=args.quiet_wait,
                  profile=args.profile and str(Path(args.profile).resolve()), state=str(STATE))
    STATE.mkdir(exist_ok=True)
    specs = []
    for name, config, batch in presets:
        if args.nanogpt:
            shape = [o for o in args.set if o.startswith("model.")]  # the same model shape on both sides
            specs.append(dict(common, name=name, side="nanoGPT", config=config, batch=batch, overrides=shape,
                              lever=""))
        specs.append(dict(common, name=name, side="slm", config=config, batch=batch, overrides=args.set, lever=""))
        for variant in args.variant:
            specs.append(dict(common, name=name, side="slm", config=config, batch=batch,
                              overrides=[*args.set, *variant.split(",")], lever=""))
        if args.levers:
            for lever, off in LEVERS.items():
                if not lever_is_on(config, args.set, off):
                    continue  # this config does not use it: nothing to turn off
                specs.append(dict(common, name=name, side="slm", config=config, batch=batch,
                                  overrides=[*args.set, off], lever=f"without {lever}"))

    peak = matmul_peak() if cuda else 1e12
    device_name = torch.cuda.get_device_name() if cuda else "CPU (peak taken as 1 TFLOP/s)"
    torch.cuda.empty_cache()
    print(f"{device_name} | torch {torch.__version__} | measured bf16 matmul peak "
          f"{peak / 1e12:.0f} TFLOP/s | {time.strftime('%Y-%m-%d')}", flush=True)
    threads = max(1, (os.cpu_count() or 4) // args.jobs)
    results = []

    def record(r: dict) -> None:
        if "error" not in r:
            r["mfu"] = flops_per_token(r["config"], r["overrides"]) * r["tokens_per_sec"] / peak
        results.append(r)
        print(row(r), flush=True)

    retry = []  # settings that ran out of memory next to others compiling: again at the end, the GPU to themselves
    with ThreadPoolExecutor(args.jobs) as pool:
        for spec, r in zip(specs, pool.map(lambda s: launch(s, args.timeout, threads), specs)):
            if r.get("oom"):
                retry.append(spec)
            else:
                record(r)
    for spec in retry:
        record(launch({**spec, "exclusive": True}, args.timeout, threads))

    print("\nsummary")
    print(header())
    for r in results:
        print(row(r, results))
    if args.nanogpt:  # best micro-batch of each side, per model
        for name in dict.fromkeys(r["name"] for r in results):
            best = {side: max((r["tokens_per_sec"] for r in results if r["name"] == name and r["side"] == side
                               and not r["lever"] and "error" not in r), default=0) for side in ("slm", "nanoGPT")}
            if best["nanoGPT"]:
                print(f"{name}: best slm {best['slm']:,.0f} vs best nanoGPT {best['nanoGPT']:,.0f} tokens/s "
                      f"= {best['slm'] / best['nanoGPT']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": device_name, "torch": torch.__version__,
                                               "peak_flops": peak, "results": results}, indent=2))


def header() -> str:
    return (f"{'setting':14s} {'mb':>5s} {'side':8s} {'variant':30s} {'tokens/s':>11s} {'ms/step':>8s} {'MFU':>6s} "
            f"{'GiB':>5s} {'vs nanoGPT':>10s}")


def row(r: dict, results: list[dict] | None = None) -> str:
    head = f"{r['name']:14s} {r['batch']:5d} {r['side']:8s} {(r['lever'] or ' '.join(r['overrides']))[:30]:30s}"
    if "error" in r:
        return f"{head} failed: {r['error'][:200]}"
    ratio = ""
    for other in results or []:
        if (other["side"] == "nanoGPT" and r["side"] == "slm" and other["name"] == r["name"]
                and other["batch"] == r["batch"] and "error" not in other):
            ratio = f"{r['tokens_per_sec'] / other['tokens_per_sec']:.2f}x"
    note = "" if r.get("quiet", True) else "  (timed while another setting compiled)"
    return (f"{head} {r['tokens_per_sec']:11,.0f} {r['ms_per_step']:8.2f} {r['mfu']:6.1%} {r['peak_mem_gib']:5.1f} "
            f"{ratio:>10s}{note}")


if __name__ == "__main__":
    main()
