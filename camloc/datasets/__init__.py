"""Datasets: each yields the same pair records, grouped by image."""
from camloc.datasets.records import ImagePairs, Pair, count_pairs, dataset_prompts
from camloc.datasets.registry import DATASETS, DEMO_DIR, data_root, list_datasets, load_dataset, register_dataset

__all__ = ["DATASETS", "DEMO_DIR", "ImagePairs", "Pair", "count_pairs", "dataset_prompts", "list_datasets", "load_dataset",
           "register_dataset", "data_root"]
