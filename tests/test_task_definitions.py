"""Tasks and data against hand computations: exact values that mutation testing showed no other test pins down."""

import gzip

import numpy as np
import pytest
import torch
from torch import nn

from l2l.tasks.cifar import cifar_tensors
from l2l.tasks.gradient_tasks import two_head_accuracies, two_head_loss
from l2l.tasks.mnist import mnist_tensors
from l2l.tasks.module import ModuleFamily, SupervisedData, fixed_shuffle
from l2l.tasks.quadratic import QuadraticFamily, QuadraticTask


def test_quadratic_loss_and_gradient_are_those_of_the_squared_residual():
    W = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    y = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    task = QuadraticTask(W, y)
    params = torch.tensor([[1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    loss = task.loss(params)
    # W theta = (3, 7), residual (2, 8): 4 + 64; the gradient 2 W^T r = (52, 72).
    torch.testing.assert_close(loss, torch.tensor([68.0], dtype=torch.float64), rtol=0, atol=0)
    (gradient,) = torch.autograd.grad(loss.sum(), params)
    torch.testing.assert_close(gradient, torch.tensor([[52.0, 72.0]], dtype=torch.float64), rtol=0, atol=0)


def test_quadratic_family_draws_standard_normal_W_then_y_and_starts_at_zero():
    task = QuadraticFamily(dim=3).sample(2, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(task.W, torch.randn(2, 3, 3, generator=g)) and torch.equal(task.y, torch.randn(2, 3, generator=g))
    assert torch.equal(task.init_params(), torch.zeros(2, 3))


def linear_data(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2600, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return SupervisedData(x[:100], y[:100], x[100:], y[100:])


@pytest.mark.parametrize("eval_examples", [None, 1700])
def test_metrics_average_over_the_whole_test_set_beyond_one_chunk(eval_examples):
    task = ModuleFamily(lambda: nn.Linear(2, 2), linear_data, batch_size=4, eval_examples=eval_examples).sample(
        2, torch.Generator().manual_seed(0)
    )
    params = task.init_params() + torch.tensor([[1.0, 0, -1.0, 0, 0, 0], [0, 1.0, 0, 0, 0.5, 0]])
    metrics = task.metrics(params)
    x, y = task.data.x_test[:eval_examples], task.data.y_test[:eval_examples]
    for k in range(2):
        weight, bias = params[k, :4].view(2, 2), params[k, 4:]
        logits = x @ weight.T + bias
        torch.testing.assert_close(metrics["test_accuracy"][k], (logits.argmax(1) == y).double().mean(), rtol=0, atol=1e-12)
        torch.testing.assert_close(metrics["test_loss"][k], nn.functional.cross_entropy(logits, y), rtol=1e-5, atol=1e-6)


def test_sampling_refuses_more_eval_examples_than_the_test_split_holds():
    # At sample, not at the first metrics: those come after a whole training run (its final comparison).
    family = ModuleFamily(lambda: nn.Linear(2, 2), linear_data, batch_size=4, eval_examples=2501)
    with pytest.raises(ValueError, match=r"eval_examples=2501 is more than the 2500 test examples of this task: use at most 2500"):
        family.sample(1, torch.Generator().manual_seed(0))


def test_the_loss_leaves_the_tasks_buffers_untouched():
    factory = lambda: nn.Sequential(nn.Flatten(), nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))  # noqa: E731
    task = ModuleFamily(factory, linear_data, batch_size=8, vectorize="vmap").sample(2, torch.Generator().manual_seed(0))
    before = {name: value.clone() for name, value in task.buffers.items()}
    task.loss(task.init_params(), task.sample_batch(torch.Generator().manual_seed(1)))
    for name, value in before.items():
        assert torch.equal(task.buffers[name], value), name


def test_dropout_masks_differ_between_instances_under_vmap():
    factory = lambda: nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2))  # noqa: E731
    task = ModuleFamily(factory, linear_data, batch_size=64, vectorize="vmap").sample(2, torch.Generator().manual_seed(0))
    params = task.init_params()[:1].expand(2, -1).contiguous()  # the same parameters and inputs for both instances
    inputs, labels, seed = task.sample_batch(torch.Generator().manual_seed(1))
    losses = task.loss(params, (inputs[:1].expand_as(inputs), labels[:1].expand_as(labels), seed))
    assert losses[0] != losses[1]


def test_fixed_shuffle_is_one_seed_0_permutation_applied_to_inputs_and_labels():
    x, y = torch.arange(50), torch.arange(50) * 10
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)  # the global RNG plays no part
    shuffled_x, shuffled_y = fixed_shuffle(x, y)
    assert torch.equal(shuffled_x, order) and torch.equal(shuffled_y, order * 10)


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_mnist_tensors_scale_pixels_to_the_unit_interval_and_take_a_prefix_of_the_shuffle(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    images = np.zeros((20, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(20)  # each image's index, to follow the order
    images[:, 5, 5] = 255
    labels = np.arange(20) % 10
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    data = mnist_tensors(str(tmp_path), "cpu", 7)
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))[:7]
    assert data.x_train.shape == (7, 1, 28, 28) and data.x_train.dtype == torch.float32
    assert torch.equal(data.x_train[:, 0, 0, 0], order.float() / 255) and (data.x_train[:, 0, 5, 5] == 1.0).all()
    assert data.y_train.dtype == torch.int64 and torch.equal(data.y_train, order % 10)
    assert data.x_test.shape == (20, 1, 28, 28)


def test_cifar_tensors_standardise_with_training_statistics_and_keep_the_first_classes(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar10"
    folder.mkdir()
    x_train = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    x_test = rng.integers(100, 200, (10, 32, 32, 3), dtype=np.uint8)  # other statistics than the training split
    y_train, y_test = (np.arange(30) % 10).astype(np.uint8), (np.arange(10) % 10).astype(np.uint8)
    np.savez(folder / "cifar10.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    data = cifar_tensors(str(tmp_path), "cpu", 3, None)
    assert data.y_train.dtype == torch.int64 and set(data.y_train.tolist()) == {0, 1, 2} and len(data.y_train) == 9
    kept = torch.from_numpy(x_train[y_train < 3]).permute(0, 3, 1, 2).double() / 255
    mean, std = kept.mean(dim=(0, 2, 3), keepdim=True), kept.std(dim=(0, 2, 3), keepdim=True)
    order = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(data.x_train.double(), ((kept - mean) / std)[order], rtol=0, atol=1e-5)
    test = torch.from_numpy(x_test[y_test < 3]).permute(0, 3, 1, 2).double() / 255
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(data.x_test.double(), ((test - mean) / std)[order], rtol=0, atol=1e-5)


def test_two_head_loss_and_accuracies_by_hand():
    # Two composites: a positive whose other digit is 1 (adversary class 0) and a negative.
    labels = torch.tensor([[1, 0], [0, -1]])
    logits = torch.zeros(2, 11)
    logits[0, 1] = 2.0  # label head right on the positive
    logits[0, 2 + 3] = 1.0  # adversary names class 3: wrong
    logits[1, 1] = 1.0  # label head wrong on the negative
    loss = two_head_loss(lambda x: logits, torch.zeros(2, 1), labels)
    label_loss = nn.functional.cross_entropy(logits[:, :2], labels[:, 0])
    adversary_loss = nn.functional.cross_entropy(logits[:1, 2:], labels[:1, 1])  # the positive only
    torch.testing.assert_close(loss, label_loss + adversary_loss)
    label_accuracy, adversary_accuracy = two_head_accuracies(logits, labels)
    assert label_accuracy.item() == 0.5 and adversary_accuracy.item() == 0.0
    logits[0, 2] = 5.0  # now the adversary names class 0, right on the one positive: 1/1
    assert two_head_accuracies(logits, labels)[1].item() == 1.0


def test_each_step_gets_its_own_dropout_seed_from_the_generator():
    task = ModuleFamily(lambda: nn.Linear(2, 2), linear_data, batch_size=4).sample(1, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(3)
    seeds = [task.sample_batch(generator).seed for _ in range(3)]
    assert len(set(seeds)) == 3 and task.sample_batch(torch.Generator().manual_seed(4)).seed not in seeds


def test_a_download_whose_md5_differs_is_refused_and_leaves_nothing(tmp_path):
    from l2l.data.base import DataError, download

    source = tmp_path / "file.bin"
    source.write_bytes(b"not the official bytes")
    destination = tmp_path / "out" / "file.bin"
    with pytest.raises(DataError, match="MD5"):
        download(source.as_uri(), destination, "0" * 32)
    assert list((tmp_path / "out").iterdir()) == []


def test_forward_mode_derivatives_by_hand():
    from l2l.objectives import adversarial_example, directional_derivatives, grad_reverse

    x = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [2.0, -1.0]], dtype=torch.float64)
    # The reversal layer is the identity forward, so its forward-mode derivative is the tangent itself.
    _, derivative = torch.func.jvp(lambda z: grad_reverse(z, 2.0), (x,), (t,))
    torch.testing.assert_close(derivative, t, rtol=0, atol=0)
    # d/dx of x^2 along t is 2 x t, for one tangent per example and for T of them.
    outputs, derivatives = directional_derivatives(lambda z: z.pow(2), x, t)
    torch.testing.assert_close(outputs, x.pow(2))
    torch.testing.assert_close(derivatives, 2 * x * t)
    _, stacked = directional_derivatives(lambda z: z.pow(2), x, torch.stack([t, -t]))
    torch.testing.assert_close(stacked, torch.stack([2 * x * t, -2 * x * t]))
    # An L1 attack spends its budget on the largest gradient coordinates, shared where they tie:
    # the loss sum(z) has gradient (1, 1) everywhere, so the step is eps * (1/2, 1/2).
    attacked = adversarial_example(lambda z: z, x, torch.zeros(2), 0.5, "l1", loss=lambda out, _: out.sum(1))
    torch.testing.assert_close(attacked, x + 0.25, rtol=0, atol=0)
