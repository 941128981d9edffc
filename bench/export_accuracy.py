"""What a GGUF export costs in accuracy: a job's trained model vs its GGUF exports, on the job's own task.

Exports the job (`edgezo export --format gguf`) at each --quant, then evaluates, with the job's prompt,
verbalizer and eval split (first --eval-size rows), the trained model rebuilt from the seed-log, each
exported GGUF loaded back through transformers' GGUF loader, and the untrained base for reference.
Prints one JSON line per model (accuracy, loss, file size, and how many sentences changed from right
to wrong or back relative to the trained model) and a table.

    python bench/export_accuracy.py /tmp/sp1-copy --quants q8_0,f16 --eval-size 500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def evaluate(model, tok, spec: dict, rows: list[dict]) -> dict:
    import torch

    from edgezo.perturb import Perturber
    from edgezo.tasks import make_task

    task = make_task(spec["task"], model, tok, Perturber([]), spec["max_length"], torch.device("cpu"))
    return task.evaluate(task.encode(rows, "eval"), spec["batch_size"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("job_dir")
    ap.add_argument("--quants", default="q8_0")
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--work", default=None, help="where the GGUF files go (default: JOB_DIR/exports)")
    args = ap.parse_args()

    import torch

    from edgezo.data import data_path, read_rows
    from edgezo.export import export_job, plain_model, read_spec, trained_engine
    from edgezo.models import load

    torch.set_grad_enabled(False)
    job = Path(args.job_dir)
    spec = read_spec(job)
    rows = read_rows(data_path(spec["task"]["eval"], "eval"), "task.eval")[: args.eval_size]
    work = Path(args.work) if args.work else job / "exports"
    results = []

    def record(name: str, metrics: dict, seconds: float, size: int | None, ref: dict | None) -> None:
        row = {"model": name, "accuracy": metrics["accuracy"], "loss": metrics["loss"], "n": metrics["n"],
               "bytes": size, "eval_s": round(seconds, 1)}
        if ref is not None:
            pairs = list(zip(ref["correct"], metrics["correct"]))
            row["right_to_wrong"] = sum(a == "1" and b == "0" for a, b in pairs)
            row["wrong_to_right"] = sum(a == "0" and b == "1" for a, b in pairs)
        results.append(row)
        print(json.dumps(row), flush=True)

    engine, steps = trained_engine(job)
    t0 = time.monotonic()
    trained = evaluate(plain_model(engine), engine.tokenizer, spec, rows)
    record(f"trained ({steps} steps, {spec['precision']})", trained, time.monotonic() - t0, None, None)
    del engine

    for quant in args.quants.split(","):
        t0 = time.monotonic()
        info = export_job(job, "gguf", work / f"{spec['name']}-{quant}.gguf", quant=quant)
        print(f"exported {quant} in {time.monotonic() - t0:.0f} s -> {info['path']}", file=sys.stderr)
        model, tok, _ = load(info["path"], "fp32", torch.device("cpu"))
        t0 = time.monotonic()
        record(f"gguf {quant}", evaluate(model, tok, spec, rows), time.monotonic() - t0, info["bytes"], trained)
        del model

    from edgezo.export import base_gguf_for

    base = base_gguf_for(spec, None)
    model, tok, _ = load(str(base), "fp32", torch.device("cpu"))
    t0 = time.monotonic()
    record(f"base {base.name} (untrained)", evaluate(model, tok, spec, rows), time.monotonic() - t0,
           base.stat().st_size, trained)

    print(f"\n{'model':40} {'accuracy':>8} {'loss':>7} {'size':>10} {'r->w':>5} {'w->r':>5}")
    for r in results:
        size = f"{r['bytes'] / 2**20:.1f} MiB" if r["bytes"] else "-"
        print(f"{r['model']:40} {r['accuracy']:8.3f} {r['loss']:7.4f} {size:>10} "
              f"{r.get('right_to_wrong', '-'):>5} {r.get('wrong_to_right', '-'):>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
