"""Image sources for training and clean testing, decoded once into uint8 ImageSets, and a GPU-resident loader."""

from tta_cli.data.augment import crop_flip, random_crop_flip, sample_crop_flip
from tta_cli.data.imageset import ImageSet, to_float_nchw
from tta_cli.data.loader import DeviceLoader
from tta_cli.data.sources import load_folder, load_split

__all__ = [
    "DeviceLoader",
    "ImageSet",
    "crop_flip",
    "load_folder",
    "load_split",
    "random_crop_flip",
    "sample_crop_flip",
    "to_float_nchw",
]
