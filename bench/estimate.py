"""The one memory estimator (policies/memory.py) against what jobs measure, in one run.

    python bench/estimate.py                  # the packaged default job, DiZO with an FO projection, fo on LoRA
    python bench/estimate.py --recipes default --steps 10

Each recipe runs as `edgezo run` in its own process on the packaged model (a few steps, a short
eval), so the measured figures are that process's own (RSS on CPU, the meter's device figure on a
GPU). For every phase the job went through, the table prints what the daemon would plan for it —
the steady footprint (runtime + weights + one forward), plus the phase's lease for a heavy phase —
against the phase's measured peak, and their ratio (measured ÷ estimated: above 1 means the
estimate is short). The estimate is computed from the model's config.json before anything loads,
exactly as the daemon does at enqueue.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgezo.model_files import model_config  # noqa: E402
from edgezo.spec import DEFAULT_SPEC, load_spec  # noqa: E402
from policies import memory as mem  # noqa: E402

RECIPES = {
    "default": [],  # fzoo on the final norm: the README's main job
    "dizo-fo": ["method=dizo", "trainable=full", "optim.lr=1e-6", "optim.perturbations=1", "optim.schedule=constant",
                "dizo.projection=fo", "dizo.interval=2", "dizo.iters=1"],
    "fo-lora": ["method=fo", "trainable=lora", "optim.lr=1e-3", "optim.perturbations=1", "optim.schedule=constant"],
}


def run(name: str, sets: list[str], steps: int, eval_size: int, out: Path) -> dict:
    job = out / name
    sets = [*sets, f"steps={steps}", f"eval_size={eval_size}", "snapshot_every=0", f"name=est-{name}"]
    cmd = [sys.executable, "-m", "edgezo.cli", "run", "default", "--job-dir", str(job)]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: edgezo run failed:\n{proc.stderr[-2000:]}")
    report = json.loads((job / "report.json").read_text())
    return {"spec": load_spec(DEFAULT_SPEC, sets), "memory": report["memory"]}


def rows(spec: dict, memory: dict) -> list[tuple[str, int, int]]:
    """(phase, estimated total, measured peak) for every phase the job measured."""
    device = "cuda" if memory.get("device", "cpu").startswith("cuda") else "cpu"
    fp = mem.estimate(model_config(spec["model"]) or mem.SMOLLM2_135M, precision=spec["precision"],
                      trainable=spec["trainable"], batch_size=spec["batch_size"], max_length=spec["max_length"],
                      method=spec["method"], device=device, task_type=spec["task"]["type"], lora=spec["lora"],
                      checkpointing=bool(spec["dizo"].get("checkpointing")), dizo_layers=spec["dizo"]["layers"],
                      anchor_in_memory=str(spec["model"]).endswith(".gguf"))
    out = []
    for phase, m in memory.get("phases", {}).items():
        if phase == "load" or not m.get("peak_bytes"):
            continue  # loading grows from nothing: there is no plan for it to compare with
        out.append((phase, fp.steady + fp.heavy.get(phase, 0), int(m["peak_bytes"])))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eval-size", type=int, default=64)
    args = ap.parse_args()
    print(f"{'recipe':<10} {'phase':<11} {'estimated':>11} {'measured':>11} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.recipes.split(","):
            result = run(name, RECIPES[name], args.steps, args.eval_size, Path(tmp))
            for phase, planned, measured in rows(result["spec"], result["memory"]):
                print(f"{name:<10} {phase:<11} {mem.fmt_bytes(planned):>11} {mem.fmt_bytes(measured):>11} "
                      f"{measured / planned:>6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
