"""MNIST from its four IDX files (gzip-compressed or not), with an optional checksummed download."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from l2l.data.base import ArrayDataset, DataError, check_labels, check_root, data_dir, download, download_allowed
from l2l.data.base import directory_for_download, download_failed, missing, unreadable

MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
# MD5 of the decompressed official files: it holds for the official .gz and for any re-compression.
FILES = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
GZIP_MAGIC = b"\x1f\x8b"
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parses an IDX file, gzip-compressed or not (told by its content), into an array of the shape its header declares.

    Raises:
        DataError: the file is not IDX, or is shorter or longer than its header says.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        # By content, not by name: a browser unpacks a downloaded .gz and keeps the suffix.
        if data[:2] == GZIP_MAGIC:
            data = gzip.decompress(data)
    except PermissionError as error:
        raise unreadable(path, error) from None
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} cannot be read ({error}); delete it and fetch it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {data[:4].hex()}); delete it and fetch it again")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated (header cut short); delete it and fetch it again")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[data[2]])
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path} holds {len(data)} bytes but its header declares shape {shape} ({expected} bytes): "
            "the file is truncated or damaged; delete it and fetch it again"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def _find(directory: Path, stem: str) -> Path | None:
    kaggle = stem.replace("-idx", ".idx")  # the Kaggle copy's names: train-images.idx3-ubyte, ...
    for folder in (directory / "mnist", directory / "MNIST" / "raw", directory):
        for name in (stem, f"{stem}.gz", kaggle, f"{kaggle}.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(directory: str | os.PathLike | None = None, *, download_missing: bool | None = None) -> ArrayDataset:
    """Loads MNIST: 60,000 training and 10,000 test images ``[N, 28, 28]`` uint8 with int64 labels.

    Files are looked for in ``DIR/mnist/``, then ``DIR/MNIST/raw/``, then ``DIR/`` (``DIR`` from
    :func:`l2l.data.data_dir`), each as ``NAME`` or ``NAME.gz``, also under the Kaggle copy's
    names (``train-images.idx3-ubyte``, ...).

    Args:
        directory: the data directory (default: ``$L2L_DATA`` or ``~/.cache/l2l/data``).
        download_missing: fetch (default: ``$L2L_DOWNLOAD == "1"``) missing files into ``DIR/mnist/`` and check their MD5.

    Raises:
        DataError: files missing (the message lists where to put them) or damaged.
    """
    root = data_dir(directory)
    check_root(root)
    download_missing = download_allowed(download_missing)
    names = [f"{stem}.gz" for stem in FILES]
    paths = {}
    for stem, md5 in FILES.items():
        path = _find(root, stem)
        if path is None and download_missing:
            try:
                with directory_for_download(root / "mnist"):
                    path = _download(root / "mnist" / f"{stem}.gz", md5)
            except DataError as error:
                raise download_failed(error, root / "mnist", names) from None
        if path is None:
            raise missing("MNIST", root / "mnist", names, "--download")
        paths[stem] = path
    arrays = {stem: read_idx(path) for stem, path in paths.items()}
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        # Each file's own layout first: a 2-D labels file is not "a disagreement" between 4 and 4.
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) == 0:
            raise DataError(
                f"MNIST {split} images must be uint8 [N >= 1, 28, 28], found {images.dtype} {list(images.shape)} "
                f"in {paths[f'{split}-images-idx3-ubyte']}: not the official file; delete it and fetch it again"
            )
        if labels.ndim != 1:
            raise DataError(
                f"MNIST {split} labels must be one-dimensional [N], found shape {list(labels.shape)} "
                f"in {paths[f'{split}-labels-idx1-ubyte']}: not the official file; delete it and fetch it again"
            )
        if len(images) != len(labels):
            raise DataError(
                f"MNIST {split} files disagree: {len(images)} images but {len(labels)} labels "
                f"in {paths[f'{split}-images-idx3-ubyte']} and {paths[f'{split}-labels-idx1-ubyte']}: "
                "not the official pair; delete them and fetch them again"
            )
        check_labels(f"MNIST {split}", labels, 10)
    return ArrayDataset(
        x_train=torch.from_numpy(arrays["train-images-idx3-ubyte"].copy()),
        y_train=torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)),
        x_test=torch.from_numpy(arrays["t10k-images-idx3-ubyte"].copy()),
        y_test=torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
        classes=tuple(str(digit) for digit in range(10)),
    )


def _download(destination: Path, md5: str) -> Path:
    errors = []
    for mirror in MIRRORS:
        try:
            return download(mirror + destination.name, destination, md5, decompress_for_md5=True)
        except DataError as error:
            errors.append(str(error))
    raise DataError("MNIST download failed from every mirror:\n" + "\n".join(errors))
