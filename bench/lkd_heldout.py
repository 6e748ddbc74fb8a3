"""LKD settings on a budget: how much distilling one block lowers its loss on held-out text.

    python bench/lkd_heldout.py --configs '[{"samples": 256, "lr": 5e-4}, {"lr": 3e-4, "schedule": "constant"}]'
    python bench/lkd_heldout.py --model minilm-l6 --blocks 1,3,5 --configs '[{}]'

For each LKD configuration (JSON objects of `LKDConfig` fields; missing fields take the
defaults), every selected block is distilled exactly as `zquant.algorithms.lkd` does it (float inputs from
the original model, the same student, optimizer and schedule), and its MSE is measured before
and after on the distillation set ("train") and on 16 sequences of a held-out text ("held").
Prints one line per configuration: the ratio after / before per block, and its mean over blocks
(lower is better). Blocks are independent given their float inputs, so a few blocks stand in for
the whole run at a fraction of its time.
"""
from __future__ import annotations

import argparse
import json
import time

import zquant
from dataclasses import replace

from zquant.algorithms import lkd as L
from zquant.config import LKDConfig, get_scheme
from zquant.pipeline import capture_inputs, run_block
from zquant.plan import make_plan


def batches(ids, size: int) -> list[dict]:
    return [{"input_ids": ids[i:i + size]} for i in range(0, ids.shape[0], size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--scheme", default="w4/8a8")
    ap.add_argument("--blocks", default="5,12,20,28,29", help="comma-separated block indices")
    ap.add_argument("--configs", required=True, help="JSON list of LKDConfig fields, e.g. '[{\"lr\": 3e-4}]'")
    ap.add_argument("--heldout", default="c4", help="held-out text (packaged name or file; default c4)")
    args = ap.parse_args()

    model, tok = zquant.load(args.model), zquant.load_tokenizer(args.model)
    plan = make_plan(model, get_scheme(args.scheme))
    blocks = plan.blocks(model)
    chosen = sorted({int(b) for b in args.blocks.split(",")})
    if chosen[-1] >= len(blocks):
        raise SystemExit(f"--blocks: the model has {len(blocks)} blocks")
    for fields in json.loads(args.configs):
        cfg = LKDConfig(**fields)
        held_cfg = LKDConfig(data=args.heldout, samples=16, seq_len=cfg.seq_len, batch_size=4)
        vocab = model.get_input_embeddings().num_embeddings
        inputs = capture_inputs(model, plan, batches(L.distillation_ids(cfg, tok, vocab), cfg.batch_size))
        held = capture_inputs(model, plan, batches(L.distillation_ids(held_cfg, tok), 4))
        rows = []
        for k in range(chosen[-1] + 1):
            out, held_out = run_block(blocks[k], inputs), run_block(blocks[k], held)
            if k in chosen:
                student = L.make_student(blocks[k], plan.block_layers(k), {})
                before = (L.mean_loss(student, inputs, out, "mse"), L.mean_loss(student, held, held_out, "mse"))
                t0 = time.perf_counter()
                L.train_block(student, inputs, out, cfg, k)
                seconds = time.perf_counter() - t0
                after = (L.mean_loss(student, inputs, out, "mse"), L.mean_loss(student, held, held_out, "mse"))
                rows.append({"block": k, "train": round(after[0] / before[0], 3),
                             "held": round(after[1] / before[1], 3), "seconds": round(seconds, 1)})
            # the next block's inputs are the float model's outputs, as in LKD
            inputs = [replace(b, hidden=t) for b, t in zip(inputs, out)]
            held = [replace(b, hidden=t) for b, t in zip(held, held_out)]
        mean = sum(r["held"] for r in rows) / len(rows)
        print(json.dumps(fields), f"mean held ratio {mean:.3f}", json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
