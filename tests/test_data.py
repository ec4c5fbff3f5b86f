"""Dataset loaders: IDX and npz made in the test, corrupt files rejected, missing data explained."""

import gzip
import os
import pickle
import time

import numpy as np
import pytest
import torch

from l2l.data import DataError, load_cifar10, load_mnist, read_idx
from l2l.data.base import DATA_ENV, data_dir, file_md5


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def fake_mnist(folder, n_train=12, n_test=5, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, (n,)), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    path = tmp_path / ("x.idx.gz" if compress else "x.idx")
    write_idx(path, array, compress)
    np.testing.assert_array_equal(read_idx(path), array)


def test_load_mnist_from_a_tiny_directory(tmp_path):
    fake_mnist(tmp_path / "mnist")
    data = load_mnist(tmp_path)
    assert data.x_train.shape == (12, 28, 28) and data.x_train.dtype == torch.uint8
    assert data.y_test.shape == (5,) and data.y_test.dtype == torch.int64


def test_truncated_idx_is_rejected(tmp_path):
    fake_mnist(tmp_path / "mnist", compress=False)
    path = tmp_path / "mnist" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or damaged; delete it and fetch it again"):
        load_mnist(tmp_path)


def test_not_idx_is_rejected(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"\x89PNG\r\n\x1a\n....")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


def test_missing_mnist_says_where_to_put_the_files(tmp_path):
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path, download_missing=False)
    message = str(error.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert "--data-dir" in message and "--download" in message and DATA_ENV in message


def fake_cifar_arrays(n_train=10, n_test=4):
    rng = np.random.default_rng(1)
    return {
        "x_train": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def test_load_cifar_npz(tmp_path):
    arrays = fake_cifar_arrays()
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "cifar10.npz", **arrays)
    data = load_cifar10(tmp_path)
    assert data.x_train.shape == (10, 32, 32, 3)
    np.testing.assert_array_equal(data.y_train.numpy(), arrays["y_train"])
    assert data.classes[0] == "airplane"


def test_load_cifar_official_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(2)
    images = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, (3, 3 * 32 * 32), dtype=np.uint8)
        images[name] = x
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": x, b"labels": [1, 2, 3]}, handle)
    data = load_cifar10(tmp_path)
    assert data.x_train.shape == (15, 32, 32, 3) and data.x_test.shape == (3, 32, 32, 3)
    # Channel-major rows become HWC images.
    np.testing.assert_array_equal(data.x_test[0, :, :, 1].numpy().ravel(), images["test_batch"][0, 1024:2048])


def test_cifar_batches_refuse_arbitrary_objects(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": Evil(), b"labels": []}, handle)
    with pytest.raises(DataError, match="refusing to unpickle builtins.print"):
        load_cifar10(tmp_path)


def test_an_incomplete_batches_folder_names_the_missing_files(tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}, handle)
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    message = str(error.value)
    assert "cifar-10-batches-py/ is incomplete" in message and "--download" in message
    assert str(folder / "data_batch_2") in message and str(folder / "test_batch") in message
    assert str(folder / "data_batch_1") not in message


def test_labels_outside_the_classes_are_rejected(tmp_path):
    arrays = fake_cifar_arrays()
    arrays["y_test"][2] = 10
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match=r"CIFAR-10 test labels must be class indices 0..9, found uint8 values in \[\d+, 10\]"):
        load_cifar10(tmp_path)
    fake_mnist(tmp_path / "mnist")
    labels = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.full(12, 255), compress=True)
    with pytest.raises(DataError, match="MNIST train labels must be class indices 0..9"):
        load_mnist(tmp_path)


def test_corrupt_npz_is_rejected(tmp_path):
    (tmp_path / "cifar10.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        load_cifar10(tmp_path)


def test_npz_with_wrong_keys_is_rejected(tmp_path):
    np.savez(tmp_path / "cifar10.npz", images=np.zeros(3))
    with pytest.raises(DataError, match="lacks x_train, y_train, x_test, y_test"):
        load_cifar10(tmp_path)


def test_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert data_dir() == tmp_path / "env"
    assert data_dir(tmp_path / "flag") == tmp_path / "flag"
    monkeypatch.delenv(DATA_ENV)
    assert data_dir().name == "data"


def test_a_relative_data_directory_means_the_one_under_the_working_directory_of_each_load(tmp_path, monkeypatch):
    from l2l.tasks import get_task

    fake_mnist(tmp_path / "a" / "data" / "mnist", n_train=12)
    fake_mnist(tmp_path / "b" / "data" / "mnist", n_train=7)
    monkeypatch.setenv(DATA_ENV, "data")
    for folder, examples in (("a", 12), ("b", 7)):  # the task cache must not hand back a's images in b
        monkeypatch.chdir(tmp_path / folder)
        assert data_dir() == tmp_path / folder / "data"
        assert get_task("mnist").sample(1, torch.Generator()).data.x_train.shape[0] == examples


def test_a_damaged_gzip_is_a_data_error(tmp_path):
    fake_mnist(tmp_path / "mnist")
    path = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    damaged = bytearray(path.read_bytes())
    damaged[20:40] = bytes(20)  # inside the deflate stream: zlib.error, not OSError
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz cannot be read"):
        load_mnist(tmp_path)


def test_mnist_images_that_are_not_uint8_28x28_are_refused(tmp_path):
    fake_mnist(tmp_path / "mnist")
    images = np.zeros((12, 32, 32), dtype=np.uint8)
    write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", images, compress=True)
    with pytest.raises(DataError, match=r"MNIST train images must be uint8 \[N >= 1, 28, 28\], found uint8 \[12, 32, 32\]"):
        load_mnist(tmp_path)


@pytest.mark.parametrize("batch, message", [
    ({b"data": np.full((3, 3072), 300), b"labels": [1, 2, 3]}, r"data must be integers in 0\.\.255"),
    ({b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": [0.9, 1.5, 9.99]}, r"labels must be integers in 0\.\.9"),
    (np.zeros((3, 3072), dtype=np.uint8), "holds a ndarray, not a dict"),
    ({b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": [2**70] * 3}, r"labels must be integers"),
], ids=["data-out-of-range", "float-labels", "not-a-dict", "huge-labels"])
def test_cifar_batches_are_checked_before_any_cast(tmp_path, batch, message):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    with pytest.raises(DataError, match=message):
        load_cifar10(tmp_path)


def test_a_single_array_named_npz_is_a_data_error(tmp_path):
    (tmp_path / "cifar10").mkdir()
    with open(tmp_path / "cifar10" / "cifar10.npz", "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(DataError, match="a single .npy array, not an npz archive"):
        load_cifar10(tmp_path)


def test_a_truncated_gzip_download_tries_the_next_mirror_and_leaves_nothing(tmp_path, monkeypatch):
    import l2l.data.mnist as mnist

    good, bad = tmp_path / "good", tmp_path / "bad"
    fake_mnist(good)
    bad.mkdir()
    for path in good.iterdir():
        (bad / path.name).write_bytes(path.read_bytes()[:-30])  # cut short: EOFError while checking the MD5
    sums = {stem: file_md5(good / f"{stem}.gz", decompress=True) for stem in mnist.FILES}
    monkeypatch.setattr(mnist, "FILES", sums)
    monkeypatch.setattr(mnist, "MIRRORS", (bad.as_uri() + "/", good.as_uri() + "/"))
    data = load_mnist(tmp_path / "data", download_missing=True)
    assert data.x_train.shape == (12, 28, 28)
    assert sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir()) == sorted(f"{stem}.gz" for stem in sums)


def test_cuda_and_the_current_cuda_device_share_one_cached_copy(monkeypatch):
    from l2l.data.base import device_key

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert device_key("cuda") == device_key("cuda:0") == "cuda:0"
    assert device_key(torch.device("cpu")) == "cpu" and device_key("cuda:1") == "cuda:1"


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def no_network(*args, **kwargs):
    import urllib.error

    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.mark.parametrize("download_missing", [False, True])
@pytest.mark.parametrize("loader", [load_mnist, load_cifar10], ids=["mnist", "cifar"])
def test_a_data_directory_that_is_a_file_is_named_as_such(tmp_path, monkeypatch, loader, download_missing):
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    path = tmp_path / "data"
    path.write_text("not a directory")
    with pytest.raises(DataError, match=f"data directory {path} is a file, not a directory: point --data-dir"):
        loader(path, download_missing=download_missing)


@pytest.mark.parametrize("loader, placed", [
    (load_mnist, "mnist/train-images-idx3-ubyte.gz"), (load_cifar10, "cifar10/cifar10.npz"),
], ids=["mnist", "cifar"])
def test_a_download_without_network_says_where_to_put_the_files_and_leaves_nothing(tmp_path, monkeypatch, loader, placed):
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    with pytest.raises(DataError) as error:
        loader(tmp_path, download_missing=True)
    message = str(error.value)
    assert "Temporary failure in name resolution" in message
    assert f"without internet access, put the files here:\n  {tmp_path / placed}" in message
    assert list(tmp_path.rglob("*")) == []  # no files, and not the empty folder made for them either
    with pytest.raises(DataError):
        loader(tmp_path / "new" / "data", download_missing=True)
    assert list(tmp_path.rglob("*")) == []  # nor the data directory, when the download made it


class _DroppedConnection:
    """A response that breaks off mid-transfer the way http.client does (not an OSError)."""

    def __init__(self, error):
        self.error = error

    def read(self, size=-1):
        raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_a_connection_dropped_mid_download_leaves_no_partial_file(tmp_path, monkeypatch):
    import http.client

    from l2l.data.base import download

    destination = tmp_path / "mnist" / "file.gz"
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: _DroppedConnection(http.client.IncompleteRead(b"abc", 100)))
    with pytest.raises(DataError, match=r"could not download https://example.invalid/file.gz: IncompleteRead"):
        download("https://example.invalid/file.gz", destination, "0" * 32)
    assert files_under(tmp_path) == []
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: _DroppedConnection(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        download("https://example.invalid/file.gz", destination, "0" * 32)
    assert files_under(tmp_path) == []


def test_a_download_with_the_wrong_checksum_is_deleted_and_reported(tmp_path, monkeypatch):
    import l2l.data.mnist as mnist

    fake_mnist(tmp_path / "mirror")  # not the official bytes: every MD5 differs
    monkeypatch.setattr(mnist, "MIRRORS", ((tmp_path / "mirror").as_uri() + "/",))
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path / "data", download_missing=True)
    message = str(error.value)
    assert "expected 6bbc9ace898e44ae57da46a324031adb" in message and "deleted" in message
    assert str(tmp_path / "data" / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert files_under(tmp_path / "data") == []


def test_an_incomplete_batches_folder_says_to_delete_it_even_with_download(tmp_path, monkeypatch):
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path, download_missing=True)  # --download does not touch a folder that exists
    assert f"delete the folder {folder} and pass --download" in str(error.value)


def fake_cifar_tar(path, top="cifar-10-batches-py"):
    import io
    import tarfile

    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            blob = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return file_md5(path)


def test_a_cifar_download_is_unpacked_once_even_by_concurrent_loads(tmp_path, monkeypatch):
    import threading

    import l2l.data.cifar as cifar

    archive = tmp_path / "cifar-10-python.tar.gz"
    monkeypatch.setattr(cifar, "TAR_MD5", fake_cifar_tar(archive))
    monkeypatch.setattr(cifar, "URL", archive.as_uri())
    results, errors = [], []

    def load():
        try:
            results.append(load_cifar10(tmp_path / "data", download_missing=True))
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and [r.x_train.shape for r in results] == [(10, 32, 32, 3)] * 4
    expected = [f"cifar10/cifar-10-batches-py/{n}" for n in sorted([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])]
    assert files_under(tmp_path / "data") == expected  # no archive, no scratch folders


def age(path, seconds):
    for entry in [path, *path.rglob("*")]:
        os.utime(entry, (time.time() - seconds, time.time() - seconds))


def test_a_download_sweeps_scratch_left_by_a_killed_one_but_not_a_live_ones(tmp_path, monkeypatch):
    import l2l.data.cifar as cifar
    import l2l.data.mnist as mnist

    archive = tmp_path / "cifar-10-python.tar.gz"
    monkeypatch.setattr(cifar, "TAR_MD5", fake_cifar_tar(archive))
    monkeypatch.setattr(cifar, "URL", archive.as_uri())
    folder = tmp_path / "data" / "cifar10"
    killed, live = folder / ".cifar-10-download.killed", folder / ".cifar-10-download.live"
    for scratch in (killed, live):
        (scratch / "cifar-10-python.tar.gz").parent.mkdir(parents=True)
        (scratch / "cifar-10-python.tar.gz").write_bytes(b"partial")
    age(killed, 2 * 3600)
    age(live, 2 * 3600)
    (live / "cifar-10-python.tar.gz").write_bytes(b"partial, and still growing")
    load_cifar10(tmp_path / "data", download_missing=True)
    assert not killed.exists() and live.is_dir()

    fake_mnist(tmp_path / "mirror")
    monkeypatch.setattr(mnist, "FILES", {stem: file_md5(tmp_path / "mirror" / f"{stem}.gz", decompress=True) for stem in mnist.FILES})
    monkeypatch.setattr(mnist, "MIRRORS", ((tmp_path / "mirror").as_uri() + "/",))
    (tmp_path / "data" / "mnist").mkdir()
    stale, fresh = tmp_path / "data" / "mnist" / ".train-images-idx3-ubyte.gz.x1", tmp_path / "data" / "mnist" / ".train-images-idx3-ubyte.gz.x2"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    age(stale, 2 * 3600)
    load_mnist(tmp_path / "data", download_missing=True)
    assert not stale.exists() and fresh.exists()


def test_an_archive_without_the_batches_leaves_nothing_behind(tmp_path, monkeypatch):
    import l2l.data.cifar as cifar

    archive = tmp_path / "cifar-10-python.tar.gz"
    monkeypatch.setattr(cifar, "TAR_MD5", fake_cifar_tar(archive, top="something-else"))
    monkeypatch.setattr(cifar, "URL", archive.as_uri())
    with pytest.raises(DataError, match="has no cifar-10-batches-py/ folder"):
        load_cifar10(tmp_path / "data", download_missing=True)
    assert files_under(tmp_path / "data") == []


def test_an_empty_cifar_split_is_refused(tmp_path):
    arrays = fake_cifar_arrays()
    arrays["x_test"], arrays["y_test"] = arrays["x_test"][:0], arrays["y_test"][:0]
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match=r"CIFAR-10 test images must be uint8 \[N >= 1, 32, 32, 3\], got uint8 \[0, 32, 32, 3\]"):
        load_cifar10(tmp_path)


def test_a_cifar_npz_of_the_wrong_layout_names_the_file_and_the_layout(tmp_path):
    arrays = fake_cifar_arrays()
    arrays["x_train"] = arrays["x_train"].transpose(0, 3, 1, 2)  # NCHW, not the npz's NHWC
    np.savez(tmp_path / "cifar10.npz", **arrays)
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar10.npz") in message and "got uint8 [10, 3, 32, 32]" in message
    assert "rebuild it" in message


def test_mnist_files_that_disagree_say_which_and_what_to_do(tmp_path):
    fake_mnist(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(11), compress=True)
    with pytest.raises(DataError) as error:
        load_mnist(tmp_path)
    message = str(error.value)
    assert "MNIST train files disagree: 12 images but 11 labels" in message
    assert str(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz") in message and "delete them and fetch them again" in message


@pytest.mark.parametrize("labels, images, expected", [
    (np.zeros((12, 1)), None, r"MNIST train labels must be one-dimensional \[N\], found shape \[12, 1\]"),
    (np.zeros(()), None, r"MNIST train labels must be one-dimensional \[N\], found shape \[\]"),
    (None, np.zeros((), np.uint8), r"MNIST train images must be uint8 \[N >= 1, 28, 28\], found uint8 \[\]"),
], ids=["2-d-labels", "0-d-labels", "0-d-images"])
def test_an_mnist_file_of_the_wrong_rank_is_named_not_called_a_disagreement(tmp_path, labels, images, expected):
    fake_mnist(tmp_path / "mnist")
    if labels is not None:
        write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", labels, compress=True)
    if images is not None:
        write_idx(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", images, compress=True)
    with pytest.raises(DataError, match=expected) as error:
        load_mnist(tmp_path)
    assert "disagree" not in str(error.value) and "delete it and fetch it again" in str(error.value)


def test_train_examples_beyond_the_dataset_is_refused_not_silently_cut(tmp_path, monkeypatch):
    from l2l.tasks import get_task

    fake_mnist(tmp_path / "mnist", n_train=12)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert get_task("mnist", train_examples=12).sample(1, torch.Generator()).data.x_train.shape[0] == 12
    with pytest.raises(ValueError, match=rf"train_examples=13 is more than the 12 training images of MNIST in {tmp_path}: "
                                         "use at most 12, or leave it out for all"):
        get_task("mnist", train_examples=13).sample(1, torch.Generator())
    arrays = fake_cifar_arrays(n_train=10)
    arrays["y_train"][:] = np.arange(10) % 5  # 4 training images of classes 0 and 1
    arrays["y_test"][:] = [0, 1, 2, 3]
    np.savez(tmp_path / "cifar10.npz", **arrays)
    # eval_examples=2: the fake test split has 2 images of classes 0 and 1, fewer than the default 2,000.
    assert get_task("cifar2", train_examples=4, eval_examples=2).sample(1, torch.Generator()).data.x_train.shape[0] == 4
    with pytest.raises(ValueError, match=r"train_examples=5 is more than the 4 training images of classes 0..1 of CIFAR-10"):
        get_task("cifar2", train_examples=5, eval_examples=2).sample(1, torch.Generator())


def test_a_cifar_subset_with_no_test_images_is_a_data_error(tmp_path, monkeypatch):
    from l2l.tasks import get_task

    arrays = fake_cifar_arrays()
    arrays["y_train"][:2], arrays["y_test"][:] = [0, 1], 7  # no test image of classes 0 and 1
    np.savez(tmp_path / "cifar10.npz", **arrays)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(DataError, match=rf"CIFAR-10 in {tmp_path} has no test images of classes 0..1"):
        get_task("cifar2").sample(1, torch.Generator())


@pytest.mark.parametrize("split, message", [
    (lambda x, y: (x[:0], y[:0], x, y), r"x_train has no examples"),
    (lambda x, y: (x, y, x[:0], y[:0]), r"x_test has no examples"),
    (lambda x, y: (x, y[:5], x, y), r"x_train has 8 examples but y_train has 5"),
    (lambda x, y: (x, y, x[:3], y), r"x_test has 3 examples but y_test has 8"),
], ids=["no-train", "no-test", "train-lengths", "test-lengths"])
def test_a_module_family_refuses_data_it_cannot_sample(split, message):
    from torch import nn

    from l2l.tasks import ModuleFamily, SupervisedData

    data = SupervisedData(*split(torch.randn(8, 3), torch.zeros(8, dtype=torch.long)))
    family = ModuleFamily(lambda: nn.Linear(3, 2), lambda device: data, batch_size=4)
    with pytest.raises(ValueError, match=f"{message}: the data function must return"):
        family.sample(1, torch.Generator())


def test_a_non_string_activation_is_named():
    from l2l.tasks import get_task

    with pytest.raises(ValueError, match=r"unknown activation \[1\]; choose from sigmoid, relu, tanh"):
        get_task("mnist", activation=[1])


def test_mnist_files_are_read_compressed_or_not_whatever_their_names_say(tmp_path):
    # A browser unpacks a downloaded .gz and keeps its name; a re-compressed file may have lost its suffix.
    fake_mnist(tmp_path / "unpacked" / "mnist", compress=False)
    for path in (tmp_path / "unpacked" / "mnist").iterdir():
        path.rename(path.with_name(path.name + ".gz"))
    fake_mnist(tmp_path / "packed" / "mnist", compress=True)
    for path in (tmp_path / "packed" / "mnist").iterdir():
        path.rename(path.with_suffix(""))
    fake_mnist(tmp_path / "named" / "mnist")
    expected = load_mnist(tmp_path / "named")
    for folder in ("unpacked", "packed"):
        loaded = load_mnist(tmp_path / folder)
        assert torch.equal(loaded.x_train, expected.x_train) and torch.equal(loaded.y_test, expected.y_test), folder


def test_a_cifar_batch_of_the_wrong_layout_names_the_batch(tmp_path):
    # One batch whose labels are a column ([[3], [1], ...]) was a bare ValueError from np.concatenate.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [[1], [2], [3]] if name == "data_batch_3" else [1, 2, 3]
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": np.zeros((3, 3072), dtype=np.uint8), b"labels": labels}, handle)
    with pytest.raises(DataError, match=r"data_batch_3 is not a readable CIFAR-10 batch \(labels must be \[3\] \(one per image\), found \[3, 1\]\)"):
        load_cifar10(tmp_path)
    with open(folder / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": np.zeros((3, 3000), dtype=np.uint8), b"labels": [1, 2, 3]}, handle)
    with pytest.raises(DataError, match=r"data_batch_3 is not a readable CIFAR-10 batch \(data must be \[N, 3072\], found \[3, 3000\]\)"):
        load_cifar10(tmp_path)


def test_cifar_labels_that_are_not_numbers_are_a_data_error(tmp_path):
    # Text labels ("cat") were a bare numpy UFuncTypeError from the error message's own min().
    arrays = {**fake_cifar_arrays(), "y_train": np.array(["cat"] * 10)}
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "cifar10.npz", **arrays)
    with pytest.raises(DataError, match=r"CIFAR-10 train labels must be class indices 0\.\.9, found <U3 values: the files"):
        load_cifar10(tmp_path)


def test_mnist_under_the_names_of_the_kaggle_copy_is_found(tmp_path):
    # The widely used Kaggle copy names its files train-images.idx3-ubyte, ... (a dot before idx).
    fake_mnist(tmp_path / "official" / "mnist", compress=False)
    fake_mnist(tmp_path / "kaggle" / "mnist", compress=False)
    for path in (tmp_path / "kaggle" / "mnist").iterdir():
        path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    assert torch.equal(load_mnist(tmp_path / "kaggle").x_train, load_mnist(tmp_path / "official").x_train)


@pytest.mark.parametrize("where", ["cifar10", "."])
def test_an_official_cifar_archive_left_packed_is_named_with_how_to_unpack_it(tmp_path, where):
    (tmp_path / where).mkdir(exist_ok=True)
    archive = tmp_path / where / "cifar-10-python.tar.gz"
    archive.write_bytes(b"not unpacked")
    with pytest.raises(DataError) as error:
        load_cifar10(tmp_path, download_missing=False)
    assert f"found the official archive {archive}: unpack it there (tar xzf {archive} -C {archive.parent})" in str(error.value)


def _unreadable(monkeypatch, path):
    """Makes ``path`` unreadable, also to root (whom chmod does not stop)."""
    import builtins

    path.chmod(0)
    real_open = builtins.open

    def open_(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)


@pytest.mark.parametrize("dataset", ["mnist", "cifar-npz", "cifar-batches"])
def test_a_dataset_file_without_read_permission_is_named_as_such_not_as_damaged(tmp_path, monkeypatch, dataset):
    # An intact file on a shared disk: "delete it and fetch it again" would lose it for everyone.
    if dataset == "mnist":
        fake_mnist(tmp_path / "mnist")
        path, load = tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz", load_mnist
    elif dataset == "cifar-npz":
        (tmp_path / "cifar10").mkdir()
        path, load = tmp_path / "cifar10" / "cifar10.npz", load_cifar10
        np.savez(path, **fake_cifar_arrays())
    else:
        folder = tmp_path / "cifar-10-batches-py"
        folder.mkdir()
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (folder / name).write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), dtype=np.uint8), b"labels": [1]}))
        path, load = folder / "data_batch_2", load_cifar10
    _unreadable(monkeypatch, path)
    with pytest.raises(DataError) as error:
        load(tmp_path)
    message = str(error.value)
    assert f"{path} cannot be opened: Permission denied; make it readable (chmod a+r {path})" in message
    assert "delete" not in message
