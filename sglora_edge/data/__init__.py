"""The dataset contract: `manifest.jsonl` (+ optional `tasks.json`) folders."""

from .contract import ROLES, SPLITS, Dataset, DatasetError, Pair, TaskInfo, load_dataset

__all__ = ["ROLES", "SPLITS", "Dataset", "DatasetError", "Pair", "TaskInfo", "load_dataset"]
