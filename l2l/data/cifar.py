"""CIFAR-10 from the official pickled batches (cifar-10-batches-py) or an npz of arrays."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from l2l.data.base import ArrayDataset, DataError, check_labels, check_root, data_dir, download, download_allowed
from l2l.data.base import directory_for_download, download_failed, missing, placement, remove_stale_scratch, unreadable

ARCHIVE = "cifar-10-python.tar.gz"
URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
TAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
SCRATCH_PREFIX = ".cifar-10-download."


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles the official batches (dicts of numpy arrays, lists, bytes) and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: a CIFAR batch holds only arrays")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _ArraysOnlyUnpickler(io.BytesIO(handle.read()), encoding="bytes").load()
        if not isinstance(batch, dict):
            raise TypeError(f"it holds a {type(batch).__name__}, not a dict")
        # Checked before casting: a cast would wrap 300 to 44 or truncate 0.9 to 0 without a word.
        images, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
            raise ValueError(f"data must be [N, 3072], found {list(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be [{len(images)}] (one per image), found {list(labels.shape)}")
        for name, values, top in ((b"data", images, 255), (b"labels", labels, 9)):
            if not np.issubdtype(values.dtype, np.integer) or (values.size and (values.min() < 0 or values.max() > top)):
                raise ValueError(f"{name.decode()} must be integers in 0..{top}, found {values.dtype}")
        images = images.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = labels.astype(np.int64)
    except PermissionError as error:
        raise unreadable(path, error) from None
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError, OverflowError,
            AssertionError) as error:
        raise DataError(f"{path} is not a readable CIFAR-10 batch ({error}); delete it and fetch it again") from None
    return np.ascontiguousarray(images), labels


BATCH_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


def _from_batches(folder: Path) -> ArrayDataset:
    absent = [name for name in BATCH_FILES if not (folder / name).is_file()]
    if absent:
        # --download alone does not help: it fetches only when no folder is there.
        raise DataError(
            "CIFAR-10: the folder cifar-10-batches-py/ is incomplete, these files are missing:\n"
            f"{placement(folder, absent)}\n"
            f"put them there, or delete the folder {folder} and pass --download to fetch it whole (needs internet access)"
        )
    train = [_read_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_batch(folder / "test_batch")
    arrays = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), x_test, y_test
    return _dataset(*arrays, source=f"{folder}", fix="delete the folder and fetch it again")


def _from_npz(path: Path) -> ArrayDataset:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it is a single .npy array, not an npz archive")
        with loaded as archive:
            arrays = {key: archive[key] for key in NPZ_KEYS if key in archive.files}
    except PermissionError as error:
        raise unreadable(path, error) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise DataError(f"{path} is not a readable npz ({error}); delete it and fetch it again") from None
    absent = [key for key in NPZ_KEYS if key not in arrays]
    if absent:
        raise DataError(f"{path} lacks {', '.join(absent)}: a CIFAR-10 npz needs {', '.join(NPZ_KEYS)}")
    fix = "rebuild it in that layout, or delete it and pass --download for the official batches"
    return _dataset(*(arrays[key] for key in NPZ_KEYS), source=f"{path}", fix=fix)


def _dataset(x_train, y_train, x_test, y_test, *, source: str, fix: str) -> ArrayDataset:
    """The arrays as a dataset, once their layout is checked (errors name ``source`` and say ``fix``)."""
    for name, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.dtype != np.uint8 or len(images) == 0:
            raise DataError(
                f"CIFAR-10 {name} images must be uint8 [N >= 1, 32, 32, 3], got {images.dtype} {list(images.shape)} "
                f"in {source}: {fix}"
            )
        if labels.shape != (len(images),):
            raise DataError(f"CIFAR-10 {name} labels must be [{len(images)}], got {list(labels.shape)} in {source}: {fix}")
        check_labels(f"CIFAR-10 {name}", labels, len(CLASSES))
    return ArrayDataset(
        x_train=torch.from_numpy(np.ascontiguousarray(x_train)),
        y_train=torch.from_numpy(np.asarray(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test)),
        y_test=torch.from_numpy(np.asarray(y_test, dtype=np.int64)),
        classes=CLASSES,
    )


def load_cifar10(directory: str | os.PathLike | None = None, *, download_missing: bool | None = None) -> ArrayDataset:
    """Loads CIFAR-10: 50,000 training and 10,000 test images ``[N, 32, 32, 3]`` uint8, int64 labels.

    Looks in ``DIR/cifar10/`` then ``DIR/`` for ``cifar10.npz`` (keys ``x_train, y_train,
    x_test, y_test``) or the official ``cifar-10-batches-py/`` folder.

    Args:
        directory: the data directory (default: ``$L2L_DATA`` or ``~/.cache/l2l/data``).
        download_missing: fetch (default: ``$L2L_DOWNLOAD == "1"``) and unpack the official archive (MD5-checked) if nothing is found.

    Raises:
        DataError: nothing found (the message says where to put it) or the files are damaged.
    """
    root = data_dir(directory)
    check_root(root)
    download_missing = download_allowed(download_missing)
    for folder in (root / "cifar10", root):
        if (folder / "cifar10.npz").is_file():
            return _from_npz(folder / "cifar10.npz")
        if (folder / "cifar-10-batches-py").is_dir():
            return _from_batches(folder / "cifar-10-batches-py")
    expected = ["cifar10.npz  (or the folder cifar-10-batches-py/)"]
    if download_missing:
        try:
            folder = _download_batches(root / "cifar10")
        except DataError as error:
            raise download_failed(error, root / "cifar10", expected) from None
        return _from_batches(folder)
    error = missing("CIFAR-10", root / "cifar10", expected, "--download")
    for folder in (root / "cifar10", root):
        if (folder / ARCHIVE).is_file():  # copied by hand, not unpacked
            archive = folder / ARCHIVE
            raise DataError(f"{error}\nfound the official archive {archive}: unpack it there (tar xzf {archive} -C {folder})")
    raise error


def _download_batches(folder: Path) -> Path:
    """Fetches and unpacks the official archive into ``folder/cifar-10-batches-py/``; returns that folder.

    Everything happens in a scratch folder beside it, renamed into place at the end: a failed or
    interrupted download leaves nothing behind, and concurrent loads never read a half-written
    batch (the first rename wins; the others find the folder there and use it).
    """
    target = folder / "cifar-10-batches-py"
    with directory_for_download(folder):
        remove_stale_scratch(folder, SCRATCH_PREFIX)
        with tempfile.TemporaryDirectory(prefix=SCRATCH_PREFIX, dir=folder) as scratch:
            archive = download(URL, Path(scratch) / ARCHIVE, TAR_MD5)
            try:
                with tarfile.open(archive) as tar:
                    tar.extractall(Path(scratch) / "unpacked", filter="data")
            except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
                raise DataError(f"could not unpack {URL}: {type(error).__name__}: {error}") from None
            unpacked = Path(scratch) / "unpacked" / "cifar-10-batches-py"
            if not unpacked.is_dir():
                raise DataError(f"the archive {URL} has no cifar-10-batches-py/ folder: not the official archive")
            try:
                os.rename(unpacked, target)
            except OSError as error:
                if not target.is_dir():  # not a concurrent load that got there first
                    raise DataError(f"could not move the unpacked batches to {target} ({error})") from None
    return target
