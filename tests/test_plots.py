"""A job's plots from its directory alone: the worker's memory samples and events, no daemon."""

from __future__ import annotations

import json
import re
import struct

from edgezo.cli import main as cli_main
from edgezo.memory import read_memory_log
from edgezo.plots import LINE
from edgezo.spec import load_spec
from edgezo.trainer import prepare_job_dir, run_job

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _line_pixels(path) -> int:
    """Pixels drawn in the memory line's colour: a plot with one sample or none draws no line."""
    import matplotlib.image as mpimg
    import numpy as np

    rgb = mpimg.imread(str(path))[..., :3]
    want = np.array([int(LINE[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(rgb - want).max(axis=-1) < 0.02).sum())


def test_report_plots_a_job_dir_without_a_daemon(tmp_path, tiny_spec_dict, capsys):
    job = prepare_job_dir(tmp_path / "job", load_spec({**tiny_spec_dict, "steps": 8, "eval_every": 4}))
    run_job(job)
    samples = read_memory_log(job)
    assert len(samples) > 1 and {"load", "zo_step", "eval"} <= {s["phase"] for s in samples}
    png = tmp_path / "out" / "mem.png"
    png.parent.mkdir()
    assert cli_main(["report", str(job), "--plot", str(png)]) == 0
    out = capsys.readouterr()
    assert "status     done" in out.out
    n = int(re.search(rf"wrote {re.escape(str(png))} \(memory timeline, (\d+) samples\)", out.err).group(1))
    assert n == len(samples) > 1
    assert _png_size(png) == (990, 440)  # 9 x 4 inches at 110 dpi
    assert _line_pixels(png) > 200  # the timeline was drawn as a line
    training = tmp_path / "out" / "mem-training.png"
    assert f"wrote {training} (training loss and eval accuracy)" in out.err
    assert _png_size(training)[1] > _png_size(png)[1]  # two panels: loss per step, accuracy per eval
    evals = [json.loads(line) for line in (job / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals if e["kind"] == "eval"] == [0, 4, 8]
