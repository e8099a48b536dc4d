"""Token shards on disk and the data-parallel loaders that read them (docs/data-format.md).

The format layer (manifest, DataError) needs only numpy; the torch-based loaders are imported on
first use, so data_prep tools and their worker processes start without loading torch.
"""
from .format import DataError, Manifest, ShardInfo, open_manifest

__all__ = ["DataError", "Manifest", "ShardInfo", "open_manifest", "PretrainDataset", "TrainLoader", "to_device",
           "val_batches"]


def __getattr__(name: str):
    if name == "PretrainDataset":
        from .dataset import PretrainDataset
        return PretrainDataset
    if name in ("TrainLoader", "to_device", "val_batches"):
        from . import loader
        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
