"""The ``slm`` command line. Each verb parses its flags and calls one plain function:

    slm prepare           -> slm.data.shards.prepare
    slm tokenizer train   -> slm.data.tokenizer.build_tokenizer
    slm train             -> slm.train.run_training
    slm finetune          -> slm.train.finetune.run_finetune
    slm eval              -> slm.evaluate.evaluate
    slm plan              -> slm.plan.plan
    slm serve             -> slm.serve.serve
    slm export            -> slm.export.export
    slm generate          -> slm.generate.generate_text
"""

from __future__ import annotations

import argparse
import os
import sys

from slm.errors import SlmError


def cmd_prepare(args) -> None:
    from slm.data.shards import prepare

    prepare(args.source, args.out, args.tokenizer, args.val_fraction, args.text_field, args.workers or None,
            shard_tokens=args.shard_tokens)


def cmd_tokenizer_train(args) -> None:
    from slm.data.tokenizer import build_tokenizer, get_tokenizer

    path = build_tokenizer(args.data, args.vocab_size, args.out, args.text_field, args.max_mb)
    tok = get_tokenizer(args.out)
    sample = "Once upon a time, there was a little robot."
    print(f"wrote {path} ({tok.vocab_size:,} tokens, <|endoftext|> = {tok.eot_id}); "
          f"{sample!r} -> {len(tok.encode(sample))} tokens")


def cmd_train(args) -> None:
    from slm.config import load_config
    from slm.train import run_training

    if args.gpus > 1:  # hand over to torchrun: one process per GPU, each running `slm train` without --gpus
        argv = []
        skip = False
        for arg in sys.argv[1:]:  # the same arguments without --gpus N / --gpus=N
            if skip or arg.startswith("--gpus="):
                skip = False
                continue
            skip = arg == "--gpus"
            if not skip:
                argv.append(arg)
        load_config(args.config, args.set)  # fail here, once, on a bad config
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}",
               "-m", "slm", *argv]
        print("launching: torchrun " + " ".join(cmd[3:]), flush=True)
        os.execv(sys.executable, cmd)

    cfg = load_config(args.config, args.set)
    result = run_training(cfg, resume=args.resume)
    print(f"done: step {result['step']:,}, val loss {result['val_loss']:.4f} (best {result['best_val_loss']:.4f}), "
          f"checkpoints in {cfg.training.out_dir}/ (best.pt, last.pt)")


def cmd_finetune(args) -> None:
    from slm.train.finetune import run_finetune

    result = run_finetune(args.checkpoint, args.data, args.out, args.lora_rank, args.lora_alpha, args.lora_dropout,
                          args.set, merge=args.merge, resume=args.resume)
    print(f"done: {result['trainable_parameters']:,} LoRA parameters trained, val loss {result['val_loss']:.4f}; "
          f"adapters in {args.out}/best.pt" + (f", merged model in {result['merged']}" if "merged" in result else ""))


def cmd_export(args) -> None:
    from slm.export import export

    path = export(args.checkpoint, args.out, format=args.format)
    print(f"exported {args.checkpoint} as {args.format} to {path}")


def cmd_eval(args) -> None:
    from slm.evaluate import evaluate, format_report

    print(format_report(evaluate(args.checkpoint, args.data, args.batches, args.batch_size, args.samples,
                                 args.max_new_tokens, args.seed, args.device)))


def cmd_plan(args) -> None:
    from slm.plan import format_plan, plan

    print(format_plan(plan(args.config, args.gpu, args.tokens, args.micro_batch, args.mfu, args.price)))


def cmd_serve(args) -> None:
    from slm.serve import serve  # imported here so other commands do not load FastAPI

    serve(args.checkpoint, args.host, args.port, args.device, max_prompt_chars=args.max_prompt_chars,
          max_new_tokens_limit=args.max_new_tokens_limit, max_concurrency=args.max_concurrency)


def cmd_generate(args) -> None:
    from slm.generate import generate_text, load_model

    lm = load_model(args.checkpoint, args.device)
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt, end="", flush=True)
        seed = None if args.seed is None else args.seed + i
        generate_text(lm, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.top_p, seed,
                      on_text=lambda piece: print(piece, end="", flush=True))
        print()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slm", description="Build, train and use small GPT language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize text into train.bin / val.bin / meta.json")
    p.add_argument("--source", default="sample",
                   help="'sample' (bundled TinyStories), a .txt/.jsonl/.json file, a folder, or a Hugging Face "
                        "dataset id such as roneneldan/TinyStories (default: sample)")
    p.add_argument("--out", default="data/sample", help="output folder (default: data/sample)")
    p.add_argument("--tokenizer", default="gpt2", help="gpt2, tinystories-4k, or a folder with tokenizer.json")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of documents held out for validation when the source has no validation split")
    p.add_argument("--text-field", default="text", help="field with the text in JSON records / HF datasets")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per core)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000,
                   help="tokens per shard file (default: 100M); an interrupted prepare resumes from its last shard")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("tokenizer", help="make a tokenizer for your data")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", help="train a byte-level BPE (Hugging Face tokenizers) on a source")
    t.add_argument("--data", default="sample", help="any source `slm prepare` accepts (default: sample)")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="folder to write tokenizer.json to")
    t.add_argument("--text-field", default="text")
    t.add_argument("--max-mb", type=float, default=1000.0, help="sample at most this much text (default: 1000 MB)")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("train", help="train a model from a YAML config (default: the tiny CPU demo)")
    p.add_argument("--config", default="tiny", help="YAML file, or a built-in name: tiny, seed30m, gpt_124m, gpt_350m")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue the run in training.out_dir from its last.pt")
    p.add_argument("--gpus", type=int, default=1,
                   help="train on N GPUs of this machine (launches torchrun; DDP, or FSDP with training.parallelism=fsdp)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune a trained model with LoRA adapters")
    p.add_argument("--checkpoint", required=True, help="the base model, e.g. runs/tiny/best.pt")
    p.add_argument("--data", required=True, help="a prepared data folder, or any source `slm prepare` accepts")
    p.add_argument("--out", required=True, help="run folder for the adapters")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha / rank")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--merge", action="store_true", help="also write merged.pt: the base with the adapters folded in")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune in --out from its last.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.max_steps=500 (repeatable)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="validation loss, perplexity, bits per byte and sample quality of a checkpoint")
    p.add_argument("--checkpoint", default="runs/tiny/best.pt")
    p.add_argument("--data", default=None, help="prepared data folder (default: the checkpoint's data.dir)")
    p.add_argument("--batches", type=int, default=None, help="evaluate only this many batches (default: all of val)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=0, help="also generate K stories and score them")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    from slm.plan import GPUS

    p = sub.add_parser("plan", help="parameters, FLOPs, memory, time and cost of training a config on a GPU")
    p.add_argument("--config", default="tiny", help="YAML file or built-in config name")
    p.add_argument("--gpu", default="H100", help=f"one of: {', '.join(GPUS)}")
    p.add_argument("--tokens", type=lambda s: int(float(s)), default=None,
                   help="tokens to train on (default: from the config), e.g. 1e9")
    p.add_argument("--micro-batch", type=int, default=None, help="micro-batch for the memory estimate")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (default: measured)")
    p.add_argument("--price", type=float, default=None, help="USD per GPU hour (default: the table in slm/plan.py)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("serve", help="serve a model over HTTP: JSON + streaming API and a web page")
    p.add_argument("--checkpoint", default="runs/tiny/best.pt")
    p.add_argument("--host", default="127.0.0.1", help="use 0.0.0.0 to be reachable from other machines")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-concurrency", type=int, default=4, help="generations at once; more get 503")
    p.add_argument("--max-new-tokens-limit", type=int, default=1024, help="most tokens one request may ask for")
    p.add_argument("--max-prompt-chars", type=int, default=4000, help="longest prompt accepted")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a checkpoint to Hugging Face transformers or safetensors")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--format", choices=["hf", "safetensors"], default="hf",
                   help="hf: a GPT-2 model folder for transformers (default); safetensors: slm's raw weights")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="write text with a trained model, streamed as it is produced")
    p.add_argument("--checkpoint", default="runs/tiny/best.pt", help="checkpoint file (default: runs/tiny/best.pt)")
    p.add_argument("--prompt", default="Once upon a time", help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold, e.g. 0.9")
    p.add_argument("--seed", type=int, default=None, help="make the output reproducible")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SlmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; lower training.batch_size (raise gradient_accumulation_steps to keep "
              "the effective batch) or use a smaller model", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            print("error: out of GPU memory; lower training.batch_size (raise training.gradient_accumulation_steps "
                  "to keep the effective batch) or use a smaller model", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
