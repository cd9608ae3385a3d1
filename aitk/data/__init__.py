"""Training data: image folders, captions, aspect buckets, latent cache, deterministic sampling.

The trainer uses `TrainingData` (see training_data.py) and catches `DatasetError`.
"""

from aitk.data.buckets import bucket_sizes, choose_bucket, crop_geometry
from aitk.data.captions import apply_trigger, read_caption
from aitk.data.images import IMAGE_EXTENSIONS, DatasetError, ImageRecord, scan_folder
from aitk.data.latent_cache import LatentCache, latent_key
from aitk.data.sampler import BucketBatchSampler
from aitk.data.training_data import Batch, TrainingData

__all__ = [
    "IMAGE_EXTENSIONS",
    "Batch",
    "BucketBatchSampler",
    "DatasetError",
    "ImageRecord",
    "LatentCache",
    "TrainingData",
    "apply_trigger",
    "bucket_sizes",
    "choose_bucket",
    "crop_geometry",
    "latent_key",
    "read_caption",
    "scan_folder",
]
