"""Former home of the image-folder data pipeline, kept so that old imports and saved configs
(``_target_: sgm.data.images.ImageFolderDataModule``) still work. The code lives in:

* :mod:`sgm.data.reading`: opening and decoding files (:func:`read_image`), up-front checks;
* :mod:`sgm.data.captions`: caption sidecars and ``metadata.jsonl``;
* :mod:`sgm.data.records`: discovery, :class:`ImageRecord`, the held-out split;
* :mod:`sgm.data.transforms`: resize / crop / flip and the size conditioning;
* :mod:`sgm.data.dataset`: :class:`ImageDataset`, :func:`collate` (the batch format);
* :mod:`sgm.data.loader`: :class:`ResumableDataLoader`;
* :mod:`sgm.data.cache`: the encoding cache;
* :mod:`sgm.data.datamodule`: :class:`ImageFolderDataModule`.
"""

from .captions import read_metadata
from .datamodule import ImageFolderDataModule
from .dataset import ImageDataset, collate
from .loader import ResumableDataLoader
from .reading import ImageReadError, SkipImage, image_to_tensor, inspect_image, read_image, to_rgb
from .records import IMAGE_EXTENSIONS, ImageRecord, find_images, scan_folder, split_records
from .transforms import RESAMPLE, CropPlan, load_view, plan_crop

__all__ = [
    "IMAGE_EXTENSIONS", "RESAMPLE", "CropPlan", "ImageDataset", "ImageFolderDataModule", "ImageReadError",
    "ImageRecord", "ResumableDataLoader", "SkipImage", "collate", "find_images", "image_to_tensor", "inspect_image",
    "load_view", "plan_crop", "read_image", "read_metadata", "scan_folder", "split_records", "to_rgb",
]
