"""The training loop, top to bottom.

    for each step:
        lr <- warmup + cosine schedule
        for each micro-step:  x, y <- batch(step, micro_step); loss <- model(x, y); backward
        clip gradients; optimizer step
        every log_every:        metrics line (loss, lr, tokens/s) -> metrics.jsonl + progress bar
        every eval_every:       val loss; best.pt when it improved
        every checkpoint_every: last.pt (model, optimizer, scaler, RNG: resume continues the same curve)

``Trainer.train_step`` is one optimizer step; ``Trainer.train`` is the loop around it (benchmarks time
``train_step`` itself, so they measure exactly what ``slm train`` runs).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slm.checkpoint import load_checkpoint, save_checkpoint
from slm.config import Config, TrainingConfig, config_from_dict, load_config, save_config
from slm.data.loader import BatchLoader, Prefetcher, read_meta
from slm.data.shards import prepare
from slm.data.tokenizer import get_tokenizer, tokenizer_info
from slm.device import attention_kernel, autocast, resolve_device, resolve_dtype
from slm.errors import CheckpointError, ConfigError, TrainingDiverged
from slm.model import GPT
from slm.model.fp8 import fp8_supported, rowwise_fp8_supported, use_fp8
from slm.plan import auto_micro_batch, gpu_peak_flops
from slm.train.distributed import (DistributedContext, init_distributed, mean_across_ranks, set_gradient_sync,
                                   shutdown, wrap_model)
from slm.train.logger import RunLogger


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
    }


def _set_rng_state(state: dict) -> None:
    """Restore ``_rng_state()``'s states, wherever the checkpoint was mapped (they must be CPU tensors) and
    on however many GPUs this machine has (a run started on 8 GPUs may continue on 1)."""
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for i, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), i)
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), *rest))
    *internal, version = state["python"]
    random.setstate((version, tuple(internal), None))


def compile_mode(mode: str, distributed: bool) -> str:
    """The torch.compile mode to use: CUDA graphs only in one process (not tried with DDP's and FSDP's hooks)."""
    if distributed:
        return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
    return mode


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


class Trainer:
    """Trains ``model`` on batches from ``train_loader``, evaluating on ``val_loader``.

    ``trainer.train()`` runs to ``config.training.max_steps``; ``trainer.resume(path)`` first restores a
    ``last.pt`` so the run continues exactly where it stopped.
    """

    def __init__(self, model: GPT, train_loader: BatchLoader, val_loader: BatchLoader, config: Config,
                 device: str | torch.device | None = None, tokenizer: dict | None = None, progress: bool = True,
                 ctx: DistributedContext | None = None):
        self.cfg = config
        tc = config.training
        self.device = torch.device(device) if device is not None else resolve_device(tc.device)
        self.ctx = ctx or DistributedContext(device=self.device)
        self.fsdp = self.ctx.enabled and tc.parallelism == "fsdp"
        self.dtype = resolve_dtype(tc.dtype, self.device)
        self.model = model.to(self.device)  # the raw model: what checkpoints hold
        self.model.gradient_checkpointing = tc.gradient_checkpointing
        self.model.loss_chunk = tc.loss_chunk  # fused output layer + cross-entropy, no full logits
        self.train_loader, self.val_loader = train_loader, val_loader
        if tc.prefetch:  # the next batches are gathered, pinned and sent to the GPU while this step runs
            self.train_loader = Prefetcher(train_loader, tc.gradient_accumulation_steps, tc.prefetch)
        self.tokenizer = tokenizer or {}
        self.progress = progress and self.ctx.is_main  # only rank 0 talks and writes
        if tc.fp8 != "none":  # FP8 matmuls while training (fp8.py), where the GPU has them
            if fp8_supported(self.device):
                which = tc.fp8
                if which in ("mlp", "all") and not rowwise_fp8_supported(self.device):
                    self._say(f"note: training.fp8={which} needs per-row FP8 scales, which PyTorch {torch.__version__} "
                              f"does not run on {_device_name(self.device)}; only the output layer trains in FP8")
                    which = "head"
                use_fp8(self.model, which)
            else:
                self._say(f"note: training.fp8={tc.fp8} needs FP8 tensor cores (compute capability 8.9+: L4, L40, "
                          f"H100, H200), which {_device_name(self.device)} lacks; training in {self.dtype} instead")
        self.model.bf16_residual = tc.bf16_residual and self.dtype == torch.bfloat16
        if tc.bf16_residual and not self.model.bf16_residual:
            self._say(f"note: training.bf16_residual applies to bfloat16 training; this run is {self.dtype}, "
                      f"its residual stream stays float32")
        self.run_dir = Path(tc.out_dir)
        self.logger = RunLogger(config, self.run_dir, enabled=self.ctx.is_main)
        self.forward = self.model  # what evaluation calls: the model, compiled on CUDA
        self.cuda_graphs = False
        if tc.compile:
            if self.device.type == "cuda":
                mode = compile_mode(tc.compile_mode, self.ctx.enabled)
                if mode != tc.compile_mode:
                    self._say(f"note: CUDA graphs (compile_mode {tc.compile_mode}) are used on one GPU; with "
                              f"{tc.parallelism.upper()} the step compiles in {mode} mode")
                self.forward = torch.compile(self.model, mode=None if mode == "default" else mode)
                self.cuda_graphs = mode in ("reduce-overhead", "max-autotune")
            else:
                self._say(f"note: torch.compile is used on CUDA only; running eagerly on {self.device.type}")
        self.train_forward = wrap_model(self.model, self.forward, self.ctx, tc.parallelism)  # + DDP / FSDP
        self.optimizer = self.model.configure_optimizer(tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps,
                                                        fused=tc.fused_optimizer and self.device.type == "cuda")
        # Every step goes through a GradScaler, which skips the optimizer step when a gradient is inf/NaN
        # (without a GPU sync on fused optimizers). fp16 needs its dynamic loss scaling; for bf16/fp32 the
        # scale starts at 1, never grows, and halves on each skipped step: we read it at log steps to count them.
        self.fp16 = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=2.0**16 if self.fp16 else 1.0,
                                           growth_interval=2000 if self.fp16 else 2**30)
        # bf16/fp32 with a fused optimizer: the clip's scaling and the skip of a non-finite step happen inside the
        # optimizer's kernel (its grad_scale and found_inf inputs) instead of as passes over every gradient
        self.fold_clip = self._can_fold_clip()
        self.found_inf_steps = torch.zeros((), device=self.device)  # steps skipped since the last check (fold_clip)
        self.skipped_steps = 0  # steps skipped for non-finite loss or gradients
        self.bad_in_a_row = 0
        self.model_state = self.model.state_dict  # what checkpoints store (a fine-tune stores only its adapters)
        self.extra: dict = {}  # more entries for every checkpoint (a fine-tune records its base and LoRA settings)
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss = float("inf")
        self.tokens_per_step = (tc.batch_size * tc.gradient_accumulation_steps * self.ctx.world_size
                                * model.config.context_length)
        # model FLOPs utilization: achieved FLOP/s over the GPU's peak (per process, so comparable across sizes)
        self.flops_per_token = model.flops_per_token()
        peak = config.logging.peak_tflops * 1e12
        if not peak and self.device.type == "cuda":
            peak = gpu_peak_flops(torch.cuda.get_device_name(self.device)) or 0.0
        self.peak_flops = peak

    def _forward(self, x, y):
        """The training/eval forward: mixed precision, the chosen attention kernel, CUDA-graph bookkeeping."""
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous replay have been consumed
        with autocast(self.device, self.dtype), attention_kernel(self.cfg.training.attention):
            return self.train_forward(x, y) if self.model.training else self.forward(x, y)

    def mfu(self, tokens_per_sec: float) -> float:
        """Model FLOPs utilization of one process: (6N + 12 L H Q T) x tokens/s / peak FLOP/s."""
        return self.flops_per_token * tokens_per_sec / self.ctx.world_size / self.peak_flops

    def _say(self, message: str) -> None:
        if self.progress:
            tqdm.write(message)

    def _log(self, record: dict) -> None:
        self.logger.log(record)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over ``eval_batches`` fixed validation batches (the same ones every time).

        With several processes each evaluates its own rows of every batch and the results are averaged.
        """
        self.model.eval()
        total = torch.zeros(2, device=self.device)  # sum of batch losses, number of batches
        for i in range(self.cfg.training.eval_batches):
            x, y = self.val_loader.get_batch(i)
            _, loss = self._forward(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=self.device)])
        if self.ctx.enabled:
            torch.distributed.all_reduce(total)
        self.model.train()
        return (total[0] / total[1]).item()

    def checkpoint(self, full: bool = True) -> dict:
        """Everything to save. Under FSDP every rank must call this (it gathers the shards)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_state = get_model_state_dict(self.model, options=options)
            optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=options) if full else None
        else:
            model_state = self.model_state()
            optimizer_state = self.optimizer.state_dict() if full else None
        state = {
            **self.extra,
            "model": model_state,
            "config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
        }
        if full:
            state.update(optimizer=optimizer_state, scaler=self.scaler.state_dict(), rng=_rng_state())
        return state

    def save(self, name: str, full: bool) -> None:
        """Write ``run_dir/name`` from rank 0 (atomically)."""
        if self.ctx.is_main or self.fsdp:
            state = self.checkpoint(full)
            if self.ctx.is_main:
                save_checkpoint(state, self.run_dir / name)

    def resume(self, path: str | Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if "optimizer" not in state:
            raise CheckpointError(f"{path} holds weights only (no optimizer state); resume from last.pt")
        saved = config_from_dict(state["config"])
        if saved.model != self.cfg.model:
            raise CheckpointError(f"{path} was trained with model {saved.model}, not {self.cfg.model}; "
                                  "use the config it was trained with")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            self.model.load_state_dict(state["model"], strict="lora" not in state)
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.step, self.tokens_seen, self.best_val_loss = state["step"], state["tokens_seen"], state["best_val_loss"]
        self._say(f"resumed from {path} at step {self.step:,} ({self.tokens_seen:,} tokens seen)")

    def _can_fold_clip(self) -> bool:
        """Whether clip + step run as one optimizer kernel (not for fp16's loss scaling, nor FSDP's sharded norm;
        PyTorch 2.6+ for ``get_total_norm``, the norm without clip_grad_norm_'s scaling pass)."""
        return (not self.fp16 and not self.fsdp and hasattr(torch.nn.utils, "get_total_norm")
                and getattr(self.optimizer, "_step_supports_amp_scaling", False))

    def _check_finite(self, last_loss: float, window: int) -> None:
        """Count the steps skipped since the last check; stop after ``max_bad_steps`` in a row."""
        if self.fp16:  # the scaler's own overflow skips are routine; only a non-finite loss is a fault
            bad = 0 if math.isfinite(last_loss) else 1
        elif self.fold_clip:
            bad = int(self.found_inf_steps.item())
            self.found_inf_steps.zero_()
        else:
            bad = round(math.log2(1.0 / self.scaler.get_scale()))
            self.scaler.update(1.0)
        self.skipped_steps += bad
        self.bad_in_a_row = self.bad_in_a_row + bad if bad >= window else 0
        if self.bad_in_a_row >= self.cfg.training.max_bad_steps:
            last = self.run_dir / "last.pt"
            good = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"training stopped at step {self.step:,}: {self.bad_in_a_row} steps in a row had a non-finite loss "
                f"or gradient; {good}. Lower training.lr, raise training.warmup_steps or use bfloat16")

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step: learning rate, micro-batches forward/backward, clip, update.

        Returns (loss, gradient norm, lr) with loss and norm still on the device (reading them waits for it).
        """
        tc = self.cfg.training
        # learning rate of this step
        lr = lr_at(self.step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        # forward/backward over the micro-batches of one optimizer step
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(tc.gradient_accumulation_steps):
            set_gradient_sync(self.train_forward, micro == tc.gradient_accumulation_steps - 1)
            x, y = self.train_loader.get_batch(self.step, micro)
            _, loss = self._forward(x, y)
            loss = loss / tc.gradient_accumulation_steps
            (loss if self.fold_clip else self.scaler.scale(loss)).backward()
            loss_sum += loss.detach()

        # clip, step, clear
        if self.fold_clip:  # the fused optimizer divides the gradients by grad_scale and skips a step with found_inf
            self.logger.log_gradients(self.model, self.step + 1)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            # clip_grad_norm_'s factor, min(1, grad_clip / (norm + 1e-6)), as a divisor
            self.optimizer.grad_scale = ((grad_norm + 1e-6) / tc.grad_clip).clamp(min=1.0) if tc.grad_clip else None
            self.optimizer.found_inf = (~grad_norm.isfinite()).float()
            self.optimizer.step()
            self.found_inf_steps += self.optimizer.found_inf
        else:
            self.scaler.unscale_(self.optimizer)
            self.logger.log_gradients(self.model, self.step + 1)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or float("inf"))
            self.scaler.step(self.optimizer)  # skipped when a gradient is not finite
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return loss_sum, grad_norm, lr

    def train(self, stop_after: int | None = None) -> dict:
        """Train up to ``max_steps`` (or stop early after step ``stop_after``, leaving a resumable last.pt)."""
        tc = self.cfg.training
        self.run_dir.mkdir(parents=True, exist_ok=True)
        n_params = self.model.count_parameters()
        if self.step == 0:
            self._log({"step": 0, "model/parameters": n_params})
        self._say(
            f"model: {n_params:,} parameters | device: {self.device} {str(self.dtype).replace('torch.', '')} | "
            f"batch: {tc.batch_size} x {tc.gradient_accumulation_steps} accumulation x {self.ctx.world_size} "
            f"process{'es' if self.ctx.world_size > 1 else ''} x {self.model.config.context_length} tokens = "
            f"{self.tokens_per_step:,} tokens/step"
        )
        self.model.train()
        bar = tqdm(total=tc.max_steps, initial=self.step, desc="train", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        train_loss = val_loss = float("nan")
        t_last, tokens_last, logged_step = time.time(), self.tokens_seen, self.step
        try:
            while self.step < tc.max_steps:
                loss_sum, grad_norm, lr = self.train_step()
                bar.update(1)
                last_step = self.step == tc.max_steps

                # log (the one place that waits for the GPU), and count skipped steps
                if self.step % tc.log_every == 0 or last_step:
                    train_loss = mean_across_ranks(loss_sum, self.ctx).item()
                    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                    self._check_finite(train_loss, self.step - logged_step)
                    logged_step = self.step
                    now = time.time()
                    tokens_per_sec = (self.tokens_seen - tokens_last) / max(now - t_last, 1e-9)
                    t_last, tokens_last = now, self.tokens_seen
                    record = {"step": self.step, "train/loss": train_loss, "train/lr": lr,
                              "train/tokens_seen": self.tokens_seen, "train/tokens_per_sec": round(tokens_per_sec, 1),
                              "train/grad_norm": grad_norm.item(), "train/skipped_steps": self.skipped_steps}
                    speed = f"{tokens_per_sec:,.0f} tok/s"
                    if self.peak_flops:
                        record["train/mfu"] = round(self.mfu(tokens_per_sec), 4)
                        speed += f" | MFU {record['train/mfu']:.0%}"
                    self._log(record)
                    val = "-" if math.isnan(val_loss) else f"{val_loss:.3f}"  # none until the first evaluation
                    bar.set_postfix_str(f"loss {train_loss:.3f} | val {val} | lr {lr:.2e} | {speed}")

                # evaluate; keep the best model
                if self.step % tc.eval_every == 0 or last_step:
                    val_loss = self.evaluate()
                    self._log({"step": self.step, "val/loss": val_loss, "train/tokens_seen": self.tokens_seen})
                    if val_loss < self.best_val_loss:
                        self.best_val_loss = val_loss
                        self.save("best.pt", full=False)
                    self._say(f"step {self.step:,}: val loss {val_loss:.4f} (best {self.best_val_loss:.4f})")

                # checkpoint to resume from
                if self.step % tc.checkpoint_every == 0 or last_step or self.step == stop_after:
                    self.save("last.pt", full=True)
                if self.step == stop_after:
                    break
        finally:
            bar.close()  # the bar ends its line, so any error message starts on a fresh one
            if isinstance(self.train_loader, Prefetcher):
                self.train_loader.close()
            self.logger.finish()
        return {"step": self.step, "train_loss": train_loss, "val_loss": val_loss,
                "best_val_loss": self.best_val_loss, "tokens_seen": self.tokens_seen}


def apply_auto_batch_size(cfg: Config, dist: DistributedContext, resume_dir: Path | None, say: bool) -> None:
    """``training.auto_batch_size``: set the micro-batch and accumulation steps (same effective batch).

    A resumed run keeps the split it started with (it decides which rows each micro-step reads). With
    several processes all take the smallest micro-batch any of them can hold.
    """
    tc = cfg.training
    saved = resume_dir / "config.yaml" if resume_dir is not None else None
    if saved is not None and saved.exists():
        old = load_config(saved).training
        if old.batch_size * old.gradient_accumulation_steps == tc.batch_size * tc.gradient_accumulation_steps:
            tc.batch_size, tc.gradient_accumulation_steps = old.batch_size, old.gradient_accumulation_steps
            return
    split = auto_micro_batch(cfg, dist.device)
    if dist.enabled:
        fits = torch.tensor([split[0] if split else 0], device=dist.device)
        torch.distributed.all_reduce(fits, op=torch.distributed.ReduceOp.MIN)
        effective = tc.batch_size * tc.gradient_accumulation_steps
        split = (int(fits.item()), effective // int(fits.item())) if fits.item() else None
    if split is None:
        if say:
            tqdm.write(f"auto_batch_size: keeping micro-batch {tc.batch_size} (sizes are chosen on a GPU only, "
                       f"and only when one sequence fits)")
        return
    if say and split != (tc.batch_size, tc.gradient_accumulation_steps):
        tqdm.write(f"auto_batch_size: micro-batch {split[0]} x {split[1]} accumulation steps "
                   f"(configured {tc.batch_size} x {tc.gradient_accumulation_steps}; the same effective batch)")
    tc.batch_size, tc.gradient_accumulation_steps = split


def run_training(cfg: Config, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """``slm train``: prepare the data if needed, build the model, train. Returns the final metrics.

    Started by torchrun, every process runs this; they share the work as ``training.parallelism`` says.
    """
    tc = cfg.training
    run_dir = Path(tc.out_dir)
    if (run_dir / "last.pt").exists() and not resume:
        raise ConfigError(f"training.out_dir: {run_dir} already holds a run; pass --resume to continue it, "
                          f"or set training.out_dir to a new folder")
    if resume and not (run_dir / "last.pt").exists():
        raise CheckpointError(f"--resume: no {run_dir / 'last.pt'} to resume from; drop --resume to start fresh")
    dist = init_distributed(tc.device)
    trainer = None
    try:
        # data: prepared once (by rank 0), then memory-mapped by every process
        data_dir = Path(cfg.data.dir)
        if dist.is_main and not (data_dir / "meta.json").exists():
            prepare(cfg.data.source, data_dir, cfg.data.tokenizer, cfg.data.val_fraction, cfg.data.text_field,
                    cfg.data.num_workers or None, progress=progress)
        if dist.enabled:
            torch.distributed.barrier()
        meta = read_meta(data_dir)
        if meta["tokenizer"] != cfg.data.tokenizer:
            raise ConfigError(f"data.tokenizer: {cfg.data.dir} was prepared with tokenizer {meta['tokenizer']!r}, "
                              f"not {cfg.data.tokenizer!r}; set data.dir to a new folder (it is prepared automatically)")
        if cfg.model.vocab_size == 0:  # auto
            cfg.model.vocab_size = meta["vocab_size"]
        if meta["vocab_size"] > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the data's tokenizer "
                              f"({meta['tokenizer']}, {meta['vocab_size']} tokens); set it to at least "
                              f"{meta['vocab_size']}")
        if tc.auto_batch_size:
            apply_auto_batch_size(cfg, dist, run_dir if resume else None, progress and dist.is_main)
        ctx, vocab = cfg.model.context_length, cfg.model.vocab_size
        train_loader = BatchLoader(data_dir, "train", tc.batch_size, ctx, dist.device, tc.seed, dist.rank, vocab,
                                   world_size=dist.world_size)
        val_loader = BatchLoader(data_dir, "val", tc.batch_size, ctx, dist.device, tc.seed, dist.rank, vocab,
                                 world_size=dist.world_size)

        # model: the same initialisation on every process
        torch.manual_seed(tc.seed)
        model = GPT(cfg.model)
        tokenizer = tokenizer_info(get_tokenizer(meta["tokenizer"]))
        trainer = Trainer(model, train_loader, val_loader, cfg, dist.device, tokenizer, progress, dist)
        if dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        if resume:
            trainer.resume(run_dir / "last.pt")
        return trainer.train(stop_after)
    finally:
        del trainer  # before the process group: see shutdown()
        shutdown(dist)
