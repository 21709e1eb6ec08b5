"""Data: the procedural shapes world and image-folder datasets (images in [-1, 1] + captions)."""

from sana_sprint.data.imagefolder import ImageFolderDataset, make_dataset
from sana_sprint.data.shapes import ShapesDataset, ShapesSample, ShapesWorld, export_imagefolder

__all__ = ["ImageFolderDataset", "ShapesDataset", "ShapesSample", "ShapesWorld", "export_imagefolder",
           "make_dataset"]
