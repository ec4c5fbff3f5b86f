"""The paper's MNIST and CIFAR families on the real datasets (a small slice, to stay fast)."""

import pytest
import torch

from l2l.config import TrainConfig
from l2l.meta.train import MetaTrainer
from l2l.meta.unroll import run
from l2l.optimizers import Adam
from l2l.tasks import get_task


def test_mnist_family_is_the_papers_mlp(real_data):
    task = get_task("mnist").sample(2, torch.Generator().manual_seed(0))
    assert task.num_params == 784 * 20 + 20 + 20 * 10 + 10
    assert task.data.x_train.shape == (60000, 1, 28, 28)
    x, y, _ = task.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape == (2, 128, 1, 28, 28)
    losses, carry = run(Adam(lr=0.03), task, 30, generator=torch.Generator().manual_seed(0))
    assert losses[-1].mean() < 0.6 * losses[0].mean()
    accuracy = task.metrics(carry.params)["test_accuracy"]
    assert (accuracy > 0.6).all()


@pytest.mark.parametrize("name, params", [("mnist-40", 784 * 40 + 40 + 410), ("mnist-2layer", 15910 + 420), ("mnist-relu", 15910)])
def test_mnist_variants(real_data, name, params):
    assert get_task(name).sample(1, torch.Generator().manual_seed(0)).num_params == params


@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar5", 5), ("cifar2", 2)])
def test_cifar_families(real_data, name, classes):
    task = get_task(name, eval_examples=200, train_examples=1000).sample(1, torch.Generator().manual_seed(0))
    assert task.data.x_train.shape[1:] == (3, 32, 32)
    assert int(task.data.y_train.max()) == classes - 1
    assert set(task.layout.kinds) == {"conv", "fc"}
    losses, carry = run(Adam(lr=0.01), task, 3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses).all()
    assert 0.0 <= float(task.metrics(carry.params)["test_accuracy"][0]) <= 1.0


def test_short_mnist_meta_training_lowers_the_meta_loss(real_data):
    config = TrainConfig(
        task="mnist", task_options={"train_examples": 2000, "eval_examples": 500}, instances=2, epochs=12,
        optimizee_steps=20, unroll=10, meta_lr=5e-3, val_every=100, val_problems=2, device="cpu",
    )
    trainer = MetaTrainer(config)
    first = [trainer.train_epoch().item() for _ in range(3)]
    for _ in range(6):
        trainer.train_epoch()
    last = [trainer.train_epoch().item() for _ in range(3)]
    assert sum(last) < 0.9 * sum(first)
