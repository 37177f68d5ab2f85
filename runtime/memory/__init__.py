"""The `memory` section of a plan: layer-wise offload with async prefetch (`offload.py`)
and activation recompute (`recompute.py`). `apply` calls both; `planlang train-step`
(`runtime/train.py`) drives a training step with them."""
