"""Training data: folders of images and captions, aspect buckets, per-epoch captions, batches and caches.

Typical use: ``config = DatasetConfig.for_folder("train", resolution=512, trigger="sks dog")`` (or
``load_dataset_config("dataset.toml")``), ``images = load_dataset(config)`` (indexes and checks; never writes into the
folders), ``loader = BatchLoader(images, batch_size=2, seed=0)``, then ``for batch in loader.batches(epoch): ...``
where each batch is a list of ``Sample`` from one bucket.
"""

from lorakit.train.data.buckets import BucketChooser, BucketPlan, make_bucket_resolutions
from lorakit.train.data.cache import LatentCache, TextEmbeddingCache
from lorakit.train.data.config import DatasetConfig, FolderConfig, load_dataset_config
from lorakit.train.data.folders import Problem
from lorakit.train.data.imageset import ImageItem, ImageSet, Sample, load_dataset
from lorakit.train.data.loader import BatchLoader

__all__ = [
    "BatchLoader",
    "BucketChooser",
    "BucketPlan",
    "DatasetConfig",
    "FolderConfig",
    "ImageItem",
    "ImageSet",
    "LatentCache",
    "Problem",
    "Sample",
    "TextEmbeddingCache",
    "load_dataset",
    "load_dataset_config",
    "make_bucket_resolutions",
]
