"""Data layer: readers (RecBole atomic, raw Amazon 2018/2023), filtering, leave-one-out splits,
persisted evaluation candidates, per-epoch training candidates and an on-disk cache.

Typical use::

    from speeder_fast.data import prepare, format_stats
    prepared = prepare(cfg.data)
    print(format_stats(prepared.stats()))
"""

from speeder_fast.data.candidates import CatalogueTooSmallError, sample_train_candidates
from speeder_fast.data.dataset import TEXT_FIELDS, PreparedData, RecDataset, SplitArrays
from speeder_fast.data.filtering import FilterReport, filter_dataset
from speeder_fast.data.prepare import prepare
from speeder_fast.data.readers import DataFormatError, detect_format, read_dataset
from speeder_fast.data.splits import leave_one_out
from speeder_fast.data.stats import compute_stats, format_stats

__all__ = [
    "TEXT_FIELDS",
    "CatalogueTooSmallError",
    "DataFormatError",
    "FilterReport",
    "PreparedData",
    "RecDataset",
    "SplitArrays",
    "compute_stats",
    "detect_format",
    "filter_dataset",
    "format_stats",
    "leave_one_out",
    "prepare",
    "read_dataset",
    "sample_train_candidates",
]
