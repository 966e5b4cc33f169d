"""Former home of AdapterLinear; our layers are one class now, lowrank.LowRankLinear. The names
stay importable for code outside adapters/ (checkpoints.py, distributed.py)."""
from .lowrank import COMMITTED_A, COMMITTED_B, OPTIONAL_STATE, LowRankLinear, new_param  # noqa: F401

AdapterLinear = LowRankLinear
