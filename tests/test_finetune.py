import math

import torch

from slm.checkpoint import load_checkpoint
from slm.cli import main
from slm.generate import load_model
from slm.model import GPT, GPTConfig
from slm.model.lora import apply_lora, merge_lora
from slm.train.finetune import run_finetune


def test_lora_starts_at_the_base_model_and_merges_exactly():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, context_length=16, n_layers=2, n_heads=2, d_model=16, d_ff=32, dropout=0.0))
    x = torch.randint(0, 50, (2, 16))
    before, _ = model(x)
    apply_lora(model, rank=4, alpha=8)
    after, _ = model(x)
    torch.testing.assert_close(before, after)  # B starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    adapted, _ = model(x)
    merge_lora(model)
    merged, _ = model(x)
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_finetune_learns_new_text_and_saves_small_adapters(trained_run, tmp_path, capsys):
    run_dir, _, _ = trained_run
    text = tmp_path / "robots.txt"
    text.write_text("\n\n".join(f"the robot {name} beeped and danced with the moon number {i}."
                                for i, name in enumerate(["zed", "quill", "ivo", "pax"] * 60)))
    out = tmp_path / "ft"
    run_finetune(run_dir / "best.pt", str(text), out, lora_rank=4,
                 overrides=["training.max_steps=60", "training.eval_every=30", "training.eval_batches=2",
                            "training.log_every=1", "training.device=cpu"], merge=True, progress=False)
    rows = [__import__("json").loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if "val/loss" in r]
    train = [r["train/loss"] for r in rows if "train/loss" in r]
    assert val[-1] < val[0] and train[-1] < train[0] - 1.0
    adapters = load_checkpoint(out / "best.pt")
    assert set(adapters["model"]) and all("lora_" in k for k in adapters["model"])
    assert (out / "best.pt").stat().st_size < 0.25 * (run_dir / "best.pt").stat().st_size
    # the adapter checkpoint and the merged one are the same model
    a, b = load_model(out / "best.pt", "cpu").model, load_model(out / "merged.pt", "cpu").model
    x = torch.randint(0, 4096, (1, 32))
    torch.testing.assert_close(a(x)[0], b(x)[0], atol=1e-4, rtol=1e-4)
    assert main(["generate", "--checkpoint", str(out / "merged.pt"), "--prompt", "the robot", "--seed", "0",
                 "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert "robot" in capsys.readouterr().out


def test_gradient_checkpointing_same_loss_less_activation_memory():
    def run(checkpointing: bool):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=100, context_length=64, n_layers=4, n_heads=2, d_model=32, d_ff=128,
                              dropout=0.1))
        model.gradient_checkpointing = checkpointing
        x = torch.randint(0, 100, (4, 64))
        saved = [0]

        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t

        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss = model(x, x)
        loss.backward()
        return loss.item(), model.tok_emb.weight.grad.clone(), saved[0]

    loss_a, grad_a, saved_a = run(False)
    loss_b, grad_b, saved_b = run(True)
    assert loss_a == loss_b
    torch.testing.assert_close(grad_a, grad_b)
    assert saved_b < saved_a / 2, (saved_a, saved_b)


def test_finetune_with_fp8_and_auto_batch_size(trained_run, tmp_path, monkeypatch, capsys):
    """The GPU configs' speed settings (FP8 matmuls, auto micro-batch) also hold for a LoRA fine-tune."""
    from slm.model import fp8
    from slm.train import trainer

    run_dir, _, _ = trained_run
    monkeypatch.setattr(trainer, "auto_micro_batch", lambda cfg, device: (8, 2))  # what a GPU would answer
    monkeypatch.setattr(trainer, "fp8_supported", lambda device: True)  # and an H100
    switched = []
    monkeypatch.setattr(trainer, "use_fp8", lambda model, which: switched.append(fp8.use_fp8(model, which)))
    result = run_finetune(run_dir / "best.pt", "sample", tmp_path / "ft", lora_rank=4,
                          overrides=["training.max_steps=4", "training.warmup_steps=1", "training.eval_every=4", "training.eval_batches=2",
                                     "training.device=cpu", "training.auto_batch_size=true", "training.fp8=all"])
    assert "auto_batch_size: micro-batch 8 x 2 accumulation steps (configured 16 x 1" in capsys.readouterr().out
    assert switched == [1 + 4 * 2]  # the output layer and the frozen base Linear of each adapter, 4 per block
    assert result["step"] == 4 and math.isfinite(result["val_loss"])
