"""Training data: image folders, captions, aspect buckets, latent / text caches, deterministic sampling.

The trainer uses `TrainingData` (see training_data.py) and catches `DatasetError`.
"""

from aitk.data.buckets import bucket_sizes, choose_bucket, crop_geometry
from aitk.data.captions import apply_trigger, process_tags, read_caption, read_metadata_captions
from aitk.data.dataset import DatasetScan, scan_dataset
from aitk.data.images import IMAGE_EXTENSIONS, DatasetError, ImageRecord, scan_folder
from aitk.data.latent_cache import LatentCache, latent_key
from aitk.data.sampler import BucketBatchSampler
from aitk.data.text_cache import TextEmbeddingCache
from aitk.data.training_data import Batch, TrainingData

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "BucketBatchSampler",
    "DatasetError",
    "DatasetScan",
    "ImageRecord",
    "LatentCache",
    "TextEmbeddingCache",
    "TrainingData",
    "apply_trigger",
    "bucket_sizes",
    "choose_bucket",
    "crop_geometry",
    "latent_key",
    "process_tags",
    "read_caption",
    "read_metadata_captions",
    "scan_dataset",
    "scan_folder",
]
