"""The GPU benchmark scripts still run (on the CPU, with tiny settings): they must not rot between GPU runs."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A stand-in for nanoGPT's model.py with its interface (GPTConfig fields, GPT(config), configure_optimizers),
# built on slm's model, so the side-by-side harness is exercised without nanoGPT's code in the repository.
FAKE_NANOGPT = '''
from dataclasses import dataclass
from slm.model import GPT as SlmGPT, GPTConfig as SlmConfig

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(SlmGPT):
    def __init__(self, c):
        super().__init__(SlmConfig(vocab_size=c.vocab_size, context_length=c.block_size, n_layers=c.n_layer,
                                   n_heads=c.n_head, d_model=c.n_embd, d_ff=4 * c.n_embd, dropout=c.dropout,
                                   bias=c.bias))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        return self.configure_optimizer(learning_rate, weight_decay, betas, 1e-8, fused=device_type == "cuda")
'''


def load_benchmark(name):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_train_throughput_runs_both_sides_and_the_levers(tmp_path):
    (tmp_path / "nano").mkdir()
    (tmp_path / "nano" / "model.py").write_text(FAKE_NANOGPT)
    out = tmp_path / "results.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--device", "cpu", "--config", "tiny",
           "--batch", "2", "--set", "training.dtype=float32", "--set", "model.n_layers=1", "--steps", "2",
           "--warmup", "1", "--nanogpt", str(tmp_path / "nano"), "--variant", "training.loss_chunk=0",
           "--jobs", "2", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["side"], r["overrides"][-1:]) for r in results] == [
        ("nanoGPT", ["model.n_layers=1"]), ("slm", ["model.n_layers=1"]), ("slm", ["training.loss_chunk=0"])]
    for r in results:
        assert "error" not in r, r
        assert r["tokens_per_sec"] > 0 and r["ms_per_step"] > 0 and 0 < r["mfu"] and r["loss"] > 0
        assert r["quiet"]  # timed only once no other setting was compiling
    assert "best slm" in proc.stdout and "vs best nanoGPT" in proc.stdout


def test_a_setting_out_of_memory_is_retried_alone_at_the_end_and_errors_name_the_exception(monkeypatch, capsys):
    """Settings compile side by side: one that ran out of memory there runs again once the others are done
    (holding the GPU); any failure's row leads with the exception, not the traceback's first lines."""
    bench = load_benchmark("train_throughput")
    calls = []
    result = {"tokens_per_sec": 1000.0, "ms_per_step": 1.0, "compile_s": 1.0, "spread": 0.0, "quiet": True,
              "loss": 5.0, "peak_mem_gib": 0.0}

    def fake_run(cmd, **kwargs):
        s = json.loads(cmd[-1])
        variant, exclusive = " ".join(s["overrides"]), s.get("exclusive", False)
        calls.append((variant, exclusive))
        where = 'Traceback (most recent call last):\n  File "x.py", line 9, in call\n    extern_kernels.mm(a, b)\n'
        if variant == "training.loss_chunk=0" and not exclusive:
            return subprocess.CompletedProcess(cmd, 1, "", where + "torch.OutOfMemoryError: CUDA out of memory.")
        if variant == "training.prefetch=0":
            return subprocess.CompletedProcess(cmd, 1, "", where + "RuntimeError: mat1 and mat2 differ")
        return subprocess.CompletedProcess(cmd, 0, "RESULT " + json.dumps(result), "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    monkeypatch.setattr(sys, "argv", ["train_throughput.py", "--device", "cpu", "--config", "tiny", "--variant",
                                      "training.loss_chunk=0", "--variant", "training.prefetch=0"])
    bench.main()
    assert calls == [("", False), ("training.loss_chunk=0", False), ("training.prefetch=0", False),
                     ("training.loss_chunk=0", True)]
    out = capsys.readouterr().out
    assert "failed: RuntimeError: mat1 and mat2 differ | " in out and "out of memory" not in out
    assert out.split("summary")[1].count(" 1,000 ") == 2  # the base setting and the retried one


def test_levers_list_only_what_the_config_turns_on():
    bench = load_benchmark("train_throughput")
    on = {c: [lever for lever, off in bench.LEVERS.items() if bench.lever_is_on(c, [], off)]
          for c in ("seed30m", "gpt_124m")}
    # gpt_124m also runs under CUDA graphs (compile_mode reduce-overhead)
    assert on["gpt_124m"] == on["seed30m"][:1] + ["compile mode"] + on["seed30m"][1:]
    assert "FP8 matmuls" in on["seed30m"] and "bf16 residual stream" in on["seed30m"]
    assert not bench.lever_is_on("seed30m", ["training.fp8=none"], bench.LEVERS["FP8 matmuls"])
    assert "fused loss (loss_chunk)" in on["seed30m"] and "short-context attention kernel" in on["seed30m"]
    assert bench.lever_is_on("seed30m", ["training.attention=cudnn"], "training.attention=sdpa")


def test_loss_benchmark_runs_and_checks_both_paths_against_the_exact_loss():
    bench = load_benchmark("loss_throughput")
    bf16 = bench.measure(64, 32, 500, 32, False, "cpu", 1)
    fp8 = bench.measure(64, 32, 500, 32, True, "cpu", 1)
    assert bf16["ms"] > 0 and fp8["ms"] > 0
    assert bf16["err_x"] < 0.01 and bf16["err_w"] < 0.01  # bf16 inputs, exact float32 softmax
    assert 0.01 < fp8["err_x"] < 0.06 and 0.01 < fp8["err_w"] < 0.06  # FP8: a few percent, and not exact


def test_scaling_runs_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--device", "cpu", "--config", "tiny", "--gpus", "2",
           "--batch", "2", "--set", "training.dtype=float32", "--set", "model.n_layers=1", "--steps", "2",
           "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["gpus"], r.get("error")) for r in results] == [(1, None), (2, None)]
    one, two = results
    assert two["tokens_per_step"] == 2 * one["tokens_per_step"] == 2 * 2 * 128  # micro-batch per process
    assert one["efficiency"] == 1.0 and 0 < two["efficiency"] and one["loss"] > 0 and two["loss"] > 0
