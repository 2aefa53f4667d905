"""The data layer: datasets, their preprocessing into each architecture's input, and the one
per-epoch order of batches that every backend trains on."""
from ..errors import DataError
from .dataset import Dataset, Split, epoch_chunks, epoch_order
from .loading import FILE_FORMATS, load_dataset, load_digits, make_synthetic
from .preprocess import Augment, Preprocess

__all__ = ["Augment", "DataError", "Dataset", "FILE_FORMATS", "Preprocess", "Split",
           "epoch_chunks", "epoch_order", "load_dataset", "load_digits", "make_synthetic"]
