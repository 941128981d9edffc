import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not Path("/dev/nvidiactl").exists():
    # The optional Triton kernels (edgezo/triton_noise.py) are checked on the CPU by triton's
    # interpreter, which has to be chosen before anything imports triton (bitsandbytes does).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from edgezo.testing.tiny import make_model_dir

    return make_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture()
def tiny_spec_dict(tiny_model_dir, tmp_path):
    from edgezo.testing.tiny import tiny_spec

    return tiny_spec(tiny_model_dir, tmp_path / "data")
