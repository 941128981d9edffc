"""ZO-eNTK fidelity against q on two model sizes, in one run (issue 13, item 5).

    python bench/kernel.py                          # a tiny model (hidden 128) and the packaged model
    python bench/kernel.py --perturbations 1,4,16,64,256 --trials 5 --plot kernel.png

For each model and trainable set: the relative Frobenius error of the ZO-eNTK from q directions
against the exact eNTK on the same train sentences (edgezo/kernel.py), next to its Gaussian
expectation. The parameter counts span four orders of magnitude; if the seed paper is right, the
error follows q (and K's spectrum), not P. `edgezo kernel SPEC` is the same measurement for one spec.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgezo import kernel  # noqa: E402
from edgezo.spec import DEFAULT_SPEC, load_spec  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--perturbations", default="1,4,16,64")
    ap.add_argument("--examples", type=int, default=8)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--packaged", default="top0,top1", help="trainable sets on the packaged model ('' to skip)")
    ap.add_argument("--plot", default="kernel.png")
    args = ap.parse_args()
    qs = sorted({int(q) for q in args.perturbations.split(",")})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from edgezo.testing.tiny import make_model_dir, tiny_spec

        tiny = tiny_spec(make_model_dir(Path(tmp) / "tiny-h128", hidden=128), Path(tmp) / "data")
        for trainable in ("top1", "full"):
            print(f"tiny-h128 {trainable} ...", file=sys.stderr, flush=True)
            rows += kernel.measure(load_spec({**tiny, "trainable": trainable}), qs, examples=args.examples,
                                   trials=args.trials)
        for trainable in filter(None, args.packaged.split(",")):
            print(f"packaged {trainable} ...", file=sys.stderr, flush=True)
            rows += kernel.measure(load_spec(DEFAULT_SPEC, [f"trainable={trainable}"]), qs, examples=args.examples,
                                   trials=args.trials)
    print(kernel.table(rows))
    kernel.plot(rows, args.plot)
    print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
