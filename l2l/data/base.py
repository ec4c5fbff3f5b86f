"""Where datasets live and how they arrive: data directory, checksummed downloads, clear errors."""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import http.client
import os
import shutil
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from l2l.config import home_path

DATA_ENV = "L2L_DATA"
DOWNLOAD_ENV = "L2L_DOWNLOAD"  # "1": loaders fetch missing files (the CLI's --download sets it)


class DataError(FileNotFoundError):
    """A dataset is missing or its files are damaged; the message says what to do."""


class ArrayDataset(NamedTuple):
    """A classification dataset as CPU tensors.

    Images are uint8 in their file layout (MNIST ``[N, 28, 28]``, CIFAR-10 ``[N, 32, 32, 3]``);
    labels are int64 ``[N]``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: tuple[str, ...]


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data directory, absolute: ``explicit`` if given, else ``$L2L_DATA``, else ``~/.cache/l2l/data``.

    Absolute because the tasks cache what they load by this path: a relative one would name
    another directory after a change of working directory.
    """
    if explicit is not None:
        return home_path(explicit).absolute()
    if os.environ.get(DATA_ENV):
        return home_path(os.environ[DATA_ENV]).absolute()
    return Path.home() / ".cache" / "l2l" / "data"


def device_key(device: torch.device | str) -> str:
    """A device as a cache key: ``"cuda"`` and ``"cuda:0"`` (the current device) name one copy of a dataset."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def download_allowed(explicit: bool | None = None) -> bool:
    """Whether loaders may fetch missing files: ``explicit`` if given, else ``$L2L_DOWNLOAD == "1"``."""
    return explicit if explicit is not None else os.environ.get(DOWNLOAD_ENV) == "1"


def file_md5(path: Path, *, decompress: bool = False) -> str:
    """MD5 of a file's bytes (of its gzip-decompressed bytes if ``decompress``)."""
    digest = hashlib.md5()
    opener = gzip.open if decompress else open
    with opener(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_root(root: Path) -> None:
    """Raises a DataError if the data directory ``root`` exists but is not a directory."""
    if root.exists() and not root.is_dir():
        raise DataError(
            f"data directory {root} is a file, not a directory: point --data-dir / ${DATA_ENV} at a directory "
            "(it is created if missing)"
        )


def make_directory(folder: Path) -> None:
    """Creates ``folder`` (and its parents), raising a DataError that names it if it cannot."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create {folder} ({error}): point --data-dir / ${DATA_ENV} at a writable directory") from None


@contextlib.contextmanager
def directory_for_download(folder: Path) -> Iterator[None]:
    """Creates ``folder`` for a download; if the download fails, removes again what it created and is still empty.

    So a failed download leaves the data directory as it found it, not with an empty ``mnist/``.
    """
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    make_directory(folder)
    try:
        yield
    except BaseException:
        for parent in created:  # deepest first
            try:
                parent.rmdir()
            except OSError:  # not empty (another file arrived) or already gone
                break
        raise


STALE_SCRATCH_S = 3600.0  # a live download writes its scratch file continuously


def remove_stale_scratch(folder: Path, prefix: str) -> None:
    """Deletes scratch files and folders named ``prefix*`` in ``folder`` that nothing wrote to for an hour.

    A download killed outright (SIGKILL, a power cut) cannot clean up after itself; the next
    download of the same file does it. A scratch entry written to within the hour may belong to a
    concurrent download and is left alone.
    """
    cutoff = time.time() - STALE_SCRATCH_S
    for entry in folder.glob(f"{glob.escape(prefix)}*"):
        try:
            paths = [entry, *entry.rglob("*")] if entry.is_dir() else [entry]
            if max(path.lstat().st_mtime for path in paths) >= cutoff:
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:  # removed meanwhile by another process, or not ours to remove
            continue


def download(url: str, destination: Path, md5: str, *, decompress_for_md5: bool = False) -> Path:
    """Downloads ``url`` to ``destination`` atomically and checks its MD5.

    Raises:
        DataError: the download failed or the checksum does not match (nothing is left behind).
    """
    make_directory(destination.parent)
    remove_stale_scratch(destination.parent, f".{destination.name}.")
    descriptor, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, handle)
        found = file_md5(Path(temporary), decompress=decompress_for_md5)
        if found != md5:
            raise DataError(
                f"download of {url} has MD5 {found}, expected {md5}: the file is damaged or not the official one "
                "(it was deleted)"
            )
        os.replace(temporary, destination)
    except BaseException as error:  # an interrupt, too, must not leave a partial file behind
        Path(temporary).unlink(missing_ok=True)
        # EOFError, zlib.error: a truncated or damaged .gz; HTTPException: a connection dropped
        # mid-transfer (IncompleteRead is not an OSError); ValueError: a malformed URL.
        failures = (OSError, EOFError, zlib.error, http.client.HTTPException, ValueError)
        if isinstance(error, DataError) or not isinstance(error, failures):
            raise
        raise DataError(f"could not download {url}: {type(error).__name__}: {error}") from None
    return destination


def unreadable(path: Path, error: OSError) -> DataError:
    """The error for a dataset file that is there but cannot be opened (permissions): intact, so never to be deleted."""
    return DataError(
        f"{path} cannot be opened: {error.strerror or error}; make it readable (chmod a+r {path}) or point "
        f"--data-dir / ${DATA_ENV} at a copy you can read"
    )


def check_labels(dataset: str, labels: np.ndarray, classes: int) -> None:
    """Raises a DataError unless every label is an integer class index in ``[0, classes)``."""
    labels = np.asarray(labels)
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= classes):
        # Text or other non-numbers have no range to show (their min() raises).
        numeric = np.issubdtype(labels.dtype, np.number) or labels.dtype == np.bool_
        span = f" in [{labels.min()}, {labels.max()}]" if numeric else ""
        raise DataError(
            f"{dataset} labels must be class indices 0..{classes - 1}, found {labels.dtype} values{span}: "
            "the files are damaged; delete them and fetch them again"
        )


def placement(directory: Path, files: list[str]) -> str:
    """The lines that say where a dataset's files go: ``"  DIR/NAME"`` for each of ``files``."""
    return "\n".join(f"  {directory / name}" for name in files)


def missing(dataset: str, directory: Path, files: list[str], flag_hint: str) -> DataError:
    """The error for a dataset whose files are not in ``directory``."""
    return DataError(
        f"{dataset} not found. Put its files here:\n{placement(directory, files)}\n"
        f"or point --data-dir / ${DATA_ENV} at a directory that has them, or pass {flag_hint} to fetch the "
        f"official files (needs internet access)."
    )


def download_failed(error: DataError, directory: Path, files: list[str]) -> DataError:
    """``error`` (a failed download) with where to put the files by hand."""
    return DataError(f"{error}\nwithout internet access, put the files here:\n{placement(directory, files)}")
