"""Dataset files to tensors: MNIST (IDX) and CIFAR-10 (pickled batches or npz), with checksummed downloads."""

from l2l.data.base import DATA_ENV, ArrayDataset, DataError, data_dir
from l2l.data.cifar import load_cifar10
from l2l.data.mnist import load_mnist, read_idx

__all__ = ["DATA_ENV", "ArrayDataset", "DataError", "data_dir", "load_cifar10", "load_mnist", "read_idx"]
