"""Data pipeline throughput: preprocessing (MB/s, tokens/s), loader (samples/s), next to the
tokens per second one training step of the demo model consumes on this machine.

    python bench/bench_data.py --out runs/bench_data.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--out", default="runs/bench_data.json")
    args = parser.parse_args(argv)

    from mohge.data.config import DataConfig
    from mohge.data.embedded import kjv_source, prepare, write_chapters
    from mohge.data.loader import build_data
    from mohge.data.preprocess import preprocess
    from mohge.train.hydra_config import compose_config
    from mohge.train.trainer import Trainer

    tmp = Path(tempfile.mkdtemp())
    embedded = prepare(str(tmp / "embedded"), quiet=True)
    docs = tmp / "kjv.jsonl"
    write_chapters(kjv_source(), docs)
    rows = []
    for workers in args.workers:
        s = preprocess([str(docs)], str(tmp / f"p{workers}"), str(embedded / "tokenizer.json"), workers, progress=False)
        rows.append({"stage": f"preprocess, {workers} worker(s)", "mb_per_s": s["mb_per_s"],
                     "tokens_per_s": s["tokens_per_s"], "documents": s["documents"], "tokens": s["tokens"]})

    cfg = compose_config("demo", [f"out_dir={tmp / 'run'}", f"data.embedded_dir={embedded}", "logging.progress=false",
                                  f"train.steps={args.train_steps}", "train.eval_every=0",
                                  "checkpoint.save_final=false"])
    t = cfg.train
    data = build_data(DataConfig(source="embedded", embedded_dir=str(embedded)), seq_len=t.seq_len,
                      micro_batch_size=t.micro_batch_size, seed=0, out_dir=str(tmp / "run"), model_vocab_size=4096,
                      train_samples=args.batches * t.micro_batch_size, valid_samples=16)
    start = time.perf_counter()
    for _ in range(args.batches):
        data.next_train_batch()
    loader_s = time.perf_counter() - start
    samples_per_s = args.batches * t.micro_batch_size / loader_s
    rows.append({"stage": f"loader (demo batches {t.micro_batch_size} x {t.seq_len})", "samples_per_s": samples_per_s,
                 "tokens_per_s": samples_per_s * t.seq_len})

    trainer = Trainer(cfg)
    trainer.train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.train_steps - 1):
        trainer.train_step()
    step_s = (time.perf_counter() - start) / (args.train_steps - 1)
    train_tps = t.global_batch_size * t.seq_len / step_s
    rows.append({"stage": "demo training step (CPU, fp32)", "tokens_per_s": train_tps})

    print(f"{'stage':<44}{'MB/s':>8}{'tokens/s':>12}{'samples/s':>11}")
    for r in rows:
        mb = f"{r['mb_per_s']:.2f}" if "mb_per_s" in r else "-"
        sps = f"{r['samples_per_s']:.0f}" if "samples_per_s" in r else "-"
        print(f"{r['stage']:<44}{mb:>8}{r['tokens_per_s']:>12.0f}{sps:>11}")
    print(f"loader headroom over training: {rows[-2]['tokens_per_s'] / train_tps:.0f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu_threads": torch.get_num_threads(), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
