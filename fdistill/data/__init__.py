"""Data sets: offline image sets (digits, shapes, image folders) and toy-teacher sample streams."""

from fdistill.data.images import DigitsDataset, ImageFolderDataset, ShapesDataset, build_image_dataset

__all__ = ["DigitsDataset", "ImageFolderDataset", "ShapesDataset", "build_image_dataset"]
