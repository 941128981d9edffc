"""edgezo: zeroth-order fine-tuning under a memory budget.

Importing this package must stay cheap: no torch, no transformers. The engine modules
(models, trainer, ...) import them and are loaded only by the commands that train.
"""

import os

# Offline always: nothing in edgezo may reach a model hub at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
