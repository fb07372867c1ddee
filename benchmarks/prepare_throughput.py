"""Tokenization throughput: `slm prepare` vs the seed projects' way.

The seeds (and nanoGPT) prepare data with Hugging Face `datasets`: load the corpus into an Arrow table,
`train_test_split`, `.map(tiktoken encode, num_proc=cores)`, then copy the token lists into one np.memmap.
`slm prepare` streams documents through a process pool straight into token shards.

    python benchmarks/prepare_throughput.py                 # a 200 MB corpus generated from the bundled sample
    python benchmarks/prepare_throughput.py --mb 50         # smaller
    python benchmarks/prepare_throughput.py --corpus my.jsonl

Each method runs in a fresh subprocess; we report wall time, MB/s of UTF-8 text and the peak resident
memory of the whole process tree (sampled every 50 ms with psutil).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SEED_WAY = r'''
import sys, numpy as np
from datasets import load_dataset
sys.path.insert(0, "src")
from slm.data.tokenizer import get_tokenizer

corpus, out, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
enc = get_tokenizer("gpt2").encoding          # tiktoken's GPT-2 encoding, as the seeds use
ds = load_dataset("json", data_files=corpus, split="train")
splits = ds.train_test_split(test_size=0.05, seed=2357, shuffle=True)
splits["val"] = splits.pop("test")

def process(example):
    ids = enc.encode_ordinary(example["text"])
    ids.append(enc.eot_token)
    return {"ids": ids, "len": len(ids)}

tokenized = splits.map(process, remove_columns=["text"], desc="tokenizing", num_proc=procs)
for split, dset in tokenized.items():
    arr_len = int(np.sum(dset["len"], dtype=np.uint64))
    arr = np.memmap(f"{out}/{split}.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
    idx = 0
    for b in range(min(1024, len(dset))):
        batch = dset.shard(num_shards=min(1024, len(dset)), index=b, contiguous=True).with_format("numpy")
        chunk = np.concatenate(batch["ids"])
        arr[idx: idx + len(chunk)] = chunk
        idx += len(chunk)
    arr.flush()
'''

SLM_WAY = r'''
import sys
sys.path.insert(0, "src")
from slm.data.shards import prepare
corpus, out, procs = sys.argv[1], sys.argv[2], int(sys.argv[3])
prepare(corpus, out, "gpt2", val_fraction=0.05, num_workers=procs, progress=False)
'''


def make_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A JSONL corpus of `megabytes` MB made of the bundled TinyStories sample, shuffled copy after copy."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from slm.data.sources import iter_documents

    stories = list(iter_documents("sample"))
    rng = random.Random(seed)
    written = 0
    with open(path, "w") as f:
        while written < megabytes * 1e6:
            rng.shuffle(stories)
            for story in stories:
                line = json.dumps({"text": story}) + "\n"
                f.write(line)
                written += len(story.encode())
                if written >= megabytes * 1e6:
                    break
    return written


def run(script: str, corpus: Path, out: Path, procs: int, env: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-c", script, str(corpus), str(out), str(procs)], env=env,
                            cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    parent, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    if proc.returncode:
        raise SystemExit(proc.stderr.read()[-3000:])
    return {"seconds": time.time() - start, "peak_rss_mb": peak / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=200.0, help="size of the generated corpus in MB")
    parser.add_argument("--corpus", help="use this .jsonl file (a 'text' field per line) instead")
    parser.add_argument("--procs", type=int, default=os.cpu_count(), help="worker processes for both methods")
    parser.add_argument("--skip-seed", action="store_true", help="only time slm prepare")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.corpus:
            corpus = Path(args.corpus)
            text_bytes = sum(len(json.loads(line)["text"].encode()) for line in open(corpus))
        else:
            corpus = tmp / "corpus.jsonl"
            text_bytes = make_corpus(corpus, args.mb)
        env = {**os.environ, "HF_DATASETS_CACHE": str(tmp / "hf-cache"), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        print(f"corpus: {corpus} ({text_bytes / 1e6:.0f} MB of text), {args.procs} processes, "
              f"{os.cpu_count()} cores")
        results = {"slm prepare": run(SLM_WAY, corpus, tmp / "slm", args.procs, env)}
        if not args.skip_seed:
            results["seeds (datasets.map + memmap)"] = run(SEED_WAY, corpus, tmp / "seed", args.procs, env)
        print(f"{'method':32s} {'seconds':>8s} {'MB/s':>8s} {'peak RSS MB':>12s}")
        for name, r in results.items():
            print(f"{name:32s} {r['seconds']:8.1f} {text_bytes / 1e6 / r['seconds']:8.2f} {r['peak_rss_mb']:12.0f}")
        if len(results) == 2:
            a, b = results.values()
            print(f"slm speed-up: {b['seconds'] / a['seconds']:.2f}x")


if __name__ == "__main__":
    main()
