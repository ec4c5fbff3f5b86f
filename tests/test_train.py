"""Truncated-BPTT meta-training: it learns, resumes exactly, and guards against non-finite steps."""

import copy
import dataclasses
import json
import math
import re

import pytest
import torch

from l2l.checkpoint import CheckpointError
from l2l.config import BenchConfig, ConfigError, TrainConfig
from l2l.meta.graphs import truncation_weights
from l2l.meta.train import MetaTrainer, NonFiniteError, loss_weight_table, loss_weights, meta_train

from helpers import NaNAfterFamily, NoisyQuadraticFamily

SMALL = dict(instances=8, optimizee_steps=10, unroll=5, val_every=2, val_problems=16, device="cpu")


def test_meta_training_lowers_the_meta_loss():
    trainer = MetaTrainer(TrainConfig(epochs=40, meta_lr=3e-3, **SMALL))
    before = trainer.validate()
    result = trainer.run(progress=False)
    assert result.best_score < 0.7 * before
    assert result.skipped_steps == 0
    assert len(result.history) == 40


@pytest.mark.parametrize(
    "task, options",
    [
        ("quadratic", {}),
        # A trained start wrecked by too large a meta-learning rate: the best weights are the
        # starting ones (epoch 0), restored from the checkpoint and handed back by the resumed run.
        ("quadratic", {"meta_lr": 5.0, "init_from": "trained"}),
        (NoisyQuadraticFamily.name, {}),  # minibatches: the batch stream must resume too
        (NaNAfterFamily.name, {"max_nonfinite": 100}),  # every epoch skips a step: the counts must resume
    ],
    ids=["quadratic", "best-before-interruption", "minibatches", "skipped-steps"],
)
def test_resume_equals_uninterrupted(tmp_path, task, options):
    if options.get("init_from") == "trained":
        options = {**options, "init_from": str(meta_train(TrainConfig(epochs=4, **SMALL), tmp_path / "init", progress=False).use_checkpoint)}
    tmp_path = tmp_path / "run"
    config = TrainConfig(task=task, epochs=6, checkpoint_every=2, **{**SMALL, **options})
    uninterrupted = MetaTrainer(config)
    uninterrupted.run(progress=False)

    def interrupt_after_five(trainer):
        if trainer.epoch == 5:
            raise KeyboardInterrupt

    interrupted = MetaTrainer(config, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run(progress=False, on_epoch=interrupt_after_five)
    resumed = meta_train(config, tmp_path, resume=tmp_path / "resume.pt", progress=False)

    final = MetaTrainer(config)
    final.restore(tmp_path / "resume.pt")
    for name, value in uninterrupted.rule.state_dict().items():
        assert torch.equal(value, final.rule.state_dict()[name]), name
        assert torch.equal(uninterrupted.best_state[name], final.best_state[name]), name
        assert torch.equal(uninterrupted.best_state[name], resumed.rule.state_dict()[name]), name
    assert final.history == uninterrupted.history
    assert final.epoch == 6 and resumed.epochs == 6
    assert (final.best_score, final.best_epoch) == (uninterrupted.best_score, uninterrupted.best_epoch)
    assert (resumed.best_score, resumed.best_epoch) == (uninterrupted.best_score, uninterrupted.best_epoch)
    assert (final.skipped, final.consecutive_skipped) == (uninterrupted.skipped, uninterrupted.consecutive_skipped)
    assert final.instance_generator.get_state().equal(uninterrupted.instance_generator.get_state())
    assert final.batch_generator.get_state().equal(uninterrupted.batch_generator.get_state())
    if "init_from" in options:
        assert uninterrupted.best_epoch == 0
    if task == NaNAfterFamily.name:
        assert uninterrupted.skipped == 6


def test_resume_rejects_a_changed_configuration(tmp_path):
    meta_train(TrainConfig(epochs=2, **SMALL), tmp_path, progress=False)
    with pytest.raises(Exception, match=r"meta_lr: checkpoint 0.001, asked 0.01"):
        meta_train(TrainConfig(epochs=4, **{**SMALL, "meta_lr": 1e-2}), tmp_path, resume=tmp_path / "resume.pt", progress=False)


def test_non_finite_meta_steps_are_skipped_and_never_written():
    trainer = MetaTrainer(TrainConfig(task=NaNAfterFamily.name, epochs=3, max_nonfinite=100, **SMALL))
    before = {k: v.clone() for k, v in trainer.rule.state_dict().items()}
    trainer.run(progress=False)
    assert trainer.skipped == 3  # one per epoch: each epoch's trajectory is abandoned
    assert [(record["meta_loss"], record["skipped"]) for record in trainer.history] == [(None, 1)] * 3
    for name, value in trainer.rule.state_dict().items():
        assert torch.equal(value, before[name]), name
        assert torch.isfinite(value).all()


def test_training_stops_with_a_clear_message_when_non_finite_persists():
    trainer = MetaTrainer(TrainConfig(task=NaNAfterFamily.name, epochs=10, max_nonfinite=3, **SMALL))
    with pytest.raises(NonFiniteError, match="3 meta-steps in a row had a non-finite meta-loss"):
        trainer.run(progress=False)
    assert trainer.skipped == 3


def test_the_non_finite_advice_of_a_resumed_run_names_only_what_it_can_do(tmp_path):
    config = TrainConfig(task=NaNAfterFamily.name, epochs=1, max_nonfinite=100, instances=3, optimizee_steps=2, unroll=1,
                         val_problems=2, device="cpu")
    meta_train(config, tmp_path, progress=False)
    resumed = dataclasses.replace(config, epochs=3, max_nonfinite=1)
    with pytest.raises(NonFiniteError) as raised:
        meta_train(resumed, tmp_path, resume=tmp_path / "resume.pt", progress=False)
    message = str(raised.value)
    assert "Lower --meta-lr" not in message  # neither may change on resume
    assert "--meta-lr and --clip-grad-norm cannot change on resume: start a fresh run with lower ones" in message
    assert f"--init-from {tmp_path / 'optimizer.pt'}" in message and "--max-nonfinite" in message
    fresh = MetaTrainer(dataclasses.replace(config, max_nonfinite=1))
    with pytest.raises(NonFiniteError, match="Lower --meta-lr or --clip-grad-norm, or check the task"):
        fresh.run(progress=False)


def test_non_finite_initial_loss_is_a_task_error():
    trainer = MetaTrainer(TrainConfig(task=NaNAfterFamily.name, task_options={"threshold": -1.0}, epochs=1, **SMALL))
    with pytest.raises(NonFiniteError, match="non-finite loss at its initial parameters"):
        trainer.run(progress=False)


def test_loss_weightings():
    assert loss_weights(TrainConfig(), 4).tolist() == [1, 1, 1, 1]
    assert loss_weights(TrainConfig(loss_weights="final"), 3).tolist() == [0, 0, 1]
    assert loss_weights(TrainConfig(loss_weights="linear"), 2).tolist() == [0.5, 1.0]
    assert loss_weights(TrainConfig(loss_weights=(1, 2), unroll=2, optimizee_steps=4), 2).tolist() == [1, 2]


def test_a_shorter_last_truncation_lays_the_named_weightings_over_its_own_length():
    table = loss_weight_table(TrainConfig(loss_weights="final"), 30, 20)
    assert truncation_weights(table, 20).tolist() == [0] * 19 + [1]
    assert truncation_weights(table, 10).tolist() == [0] * 9 + [1]  # not the first 10 of 20: all zero
    linear = loss_weight_table(TrainConfig(loss_weights="linear"), 30, 20)
    assert truncation_weights(linear, 4).tolist() == [0.25, 0.5, 0.75, 1.0]
    assert truncation_weights(loss_weight_table(TrainConfig(), 30, 20), 10).tolist() == [1] * 10
    with pytest.raises(ConfigError, match="30 optimizee steps end with a 10-step one; make optimizee_steps a multiple"):
        loss_weight_table(TrainConfig(loss_weights=(1.0,) * 20), 30, 20)
    with pytest.raises(ConfigError, match="loss_weights must not all be zero"):
        TrainConfig(loss_weights=(0, 0))


def test_the_last_truncation_of_a_final_weighted_run_has_a_meta_gradient(monkeypatch):
    trainer = MetaTrainer(TrainConfig(epochs=1, loss_weights="final", optimizee_steps=6, unroll=4, instances=4, val_problems=4))
    seen = []
    original = trainer._eager_truncation

    def recording(tasks):
        truncate = original(tasks)

        def wrapped(carries, length):
            result, carries = truncate(carries, length)
            seen.append((length, float(result.meta_loss), float(result.grad_norm)))
            return result, carries

        return wrapped

    monkeypatch.setattr(trainer, "_eager_truncation", recording)
    trainer.train_epoch()
    assert [length for length, _, _ in seen] == [4, 2]
    assert all(loss > 0 and norm > 0 for _, loss, norm in seen)


def test_the_applied_meta_gradient_is_clipped_to_the_configured_norm(monkeypatch):
    trainer = MetaTrainer(TrainConfig(epochs=1, clip_grad_norm=1e-3, **SMALL))
    applied = []
    step = trainer.meta_optimizer.step

    def recording_step(*args, **kwargs):
        applied.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.rule.parameters()])).item())
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.meta_optimizer, "step", recording_step)
    trainer.train_epoch()
    assert len(applied) == 2  # one meta-step per truncation
    assert all(norm == pytest.approx(1e-3, rel=1e-4) for norm in applied)  # the raw norms are far larger


def test_unknown_task_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown task 'quadratc' \(did you mean 'quadratic'\?\); available tasks: .*quadratic"):
        MetaTrainer(TrainConfig(task="quadratc"))


def test_cosine_meta_learning_rate_schedule():
    from l2l.meta.train import meta_learning_rate

    config = TrainConfig(epochs=11, meta_lr=1e-2, meta_lr_schedule="cosine")
    rates = [meta_learning_rate(config, epoch) for epoch in range(11)]
    assert rates[0] == pytest.approx(1e-2) and rates[-1] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert meta_learning_rate(TrainConfig(meta_lr=1e-2), 7) == 1e-2


def test_init_from_starts_from_a_use_checkpoint_and_checks_the_architecture(tmp_path):
    meta_train(TrainConfig(epochs=2, **SMALL), tmp_path / "first", progress=False)
    source = torch.load(tmp_path / "first" / "optimizer.pt", weights_only=True)["state_dict"]

    warm = MetaTrainer(TrainConfig(epochs=1, seed=5, init_from=str(tmp_path / "first" / "optimizer.pt"), **SMALL))
    cold = MetaTrainer(TrainConfig(epochs=1, seed=5, **SMALL))
    for name, value in source.items():
        assert torch.equal(warm.rule.state_dict()[name], value), name
    assert not all(torch.equal(cold.rule.state_dict()[name], value) for name, value in source.items())

    # One LSTM may start every group of a per-group rule.
    grouped = MetaTrainer(TrainConfig(epochs=1, split=("w", "b"), init_from=str(tmp_path / "first" / "optimizer.pt"), **SMALL))
    for member in grouped.rule.rules.values():
        for name, value in source.items():
            assert torch.equal(member.state_dict()[name], value), name

    with pytest.raises(ConfigError, match=r"hidden_size.*give the same --hidden-size"):
        MetaTrainer(TrainConfig(epochs=1, hidden_size=8, init_from=str(tmp_path / "first" / "optimizer.pt"), **SMALL))
    with pytest.raises(CheckpointError):
        MetaTrainer(TrainConfig(epochs=1, init_from=str(tmp_path / "missing.pt"), **SMALL))


def test_a_resumed_warm_started_run_does_not_need_its_init_checkpoint(tmp_path):
    meta_train(TrainConfig(epochs=2, **SMALL), tmp_path / "first", progress=False)
    init = tmp_path / "first" / "optimizer.pt"
    config = TrainConfig(epochs=2, checkpoint_every=1, init_from=str(init), **SMALL)
    meta_train(config, tmp_path / "second", progress=False)
    init.unlink()
    result = meta_train(dataclasses.replace(config, epochs=3), tmp_path / "second", resume=tmp_path / "second" / "resume.pt", progress=False)
    assert result.epochs == 3


def test_split_accepts_the_command_line_spelling():
    assert TrainConfig(task="cifar10", split="conv, fc").split == ("conv", "fc")
    with pytest.raises(ConfigError, match="distinct parameter kinds"):
        TrainConfig(task="cifar10", split="conv,conv")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TrainConfig(split=3), r"split must be a tuple such as \('conv', 'fc'\), got 3"),
        (lambda: TrainConfig(loss_weights=2), "loss_weights must be a tuple such as"),
        (lambda: TrainConfig(loss_weights=(1.0, True)), "loss_weights must be non-negative finite numbers"),
        (lambda: TrainConfig(seed=True), "seed must be an integer, got True"),
        (lambda: TrainConfig(device=0), "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 0"),
        (lambda: BenchConfig(lr_grid=0.1), r"lr_grid must be a tuple such as \(1e-3, 1e-2, 1e-1\), got 0.1"),
        (lambda: BenchConfig(optimizers="quadratic"), "optimizers must be a tuple such as"),
        (lambda: BenchConfig(optimizers=("",)), "every optimizer must be a checkpoint path or shipped name"),
        (lambda: BenchConfig(task_options=[1]), r"task_options must be a dict of option names \(str\) to values, got \[1\] \(a list\)"),
        (lambda: BenchConfig(seed=1.5), "seed must be an integer, got 1.5"),
    ],
)
def test_config_fields_of_the_wrong_type_name_the_field(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_bench_baselines_accept_the_command_line_spelling():
    assert BenchConfig(baselines="sgd, adam").baselines == ("sgd", "adam")
    assert BenchConfig(baselines="").baselines == ()


def test_a_warm_start_is_validated_first_so_fine_tuning_never_returns_worse_weights(tmp_path):
    meta_train(TrainConfig(epochs=4, **SMALL), tmp_path / "first", progress=False)
    init = tmp_path / "first" / "optimizer.pt"
    # A meta-learning rate this large wrecks the rule within one epoch.
    result = meta_train(TrainConfig(epochs=2, meta_lr=5.0, init_from=str(init), **SMALL), tmp_path / "ruined", progress=False)
    history = json.loads((tmp_path / "ruined" / "history.json").read_text())
    assert history[0]["epoch"] == 0 and history[0]["validation"] is not None
    assert result.best_epoch == 0
    assert all(record["validation"] > history[0]["validation"] for record in history[1:] if "validation" in record)
    kept = torch.load(tmp_path / "ruined" / "optimizer.pt", weights_only=True)
    for name, value in torch.load(init, weights_only=True)["state_dict"].items():
        assert torch.equal(kept["state_dict"][name], value), name
    metadata = kept["metadata"]
    assert (metadata["best_epoch"], metadata["epochs_trained"]) == (0, 2)
    assert metadata["validation_score"] == history[0]["validation"] == result.best_score


def test_a_save_interrupted_midway_leaves_files_a_resume_completes(tmp_path, monkeypatch):
    import l2l.meta.train as train_module
    from l2l.checkpoint import load_use_checkpoint

    config = TrainConfig(epochs=2, checkpoint_every=1, **SMALL)
    uninterrupted = meta_train(config, tmp_path / "whole", progress=False)
    real_save = train_module.save_use_checkpoint
    calls = []

    def crash_on_the_second(path, rule, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # epoch 2's use checkpoint, history and resume checkpoint not written
        return real_save(path, rule, metadata)

    monkeypatch.setattr(train_module, "save_use_checkpoint", crash_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        meta_train(config, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_module, "save_use_checkpoint", real_save)
    assert torch.load(tmp_path / "cut" / "resume.pt", weights_only=True)["epoch"] == 1  # written last, so still epoch 1
    resumed = meta_train(config, tmp_path / "cut", resume=tmp_path / "cut" / "resume.pt", progress=False)
    for name, value in uninterrupted.rule.state_dict().items():
        assert torch.equal(value, resumed.rule.state_dict()[name]), name
    assert json.loads((tmp_path / "cut" / "history.json").read_text()) == uninterrupted.history
    shipped = load_use_checkpoint(tmp_path / "cut" / "optimizer.pt")
    assert all(torch.equal(v, uninterrupted.rule.state_dict()[k]) for k, v in shipped.rule.state_dict().items())


def test_resuming_with_no_epoch_left_validates_the_last_epoch_and_writes_the_files(tmp_path):
    config = TrainConfig(epochs=3, checkpoint_every=1, **{**SMALL, "val_every": 4})
    whole = meta_train(config, tmp_path / "whole", progress=False)

    def stop_after_three(trainer):
        if trainer.epoch == 3:
            raise KeyboardInterrupt

    longer = dataclasses.replace(config, epochs=6)
    with pytest.raises(KeyboardInterrupt):
        MetaTrainer(longer, tmp_path / "cut").run(progress=False, on_epoch=stop_after_three)
    (tmp_path / "cut" / "optimizer.pt").unlink()
    resumed = meta_train(config, tmp_path / "cut", resume=tmp_path / "cut" / "resume.pt", progress=False)
    assert (resumed.best_score, resumed.best_epoch) == (whole.best_score, 3)
    assert (tmp_path / "cut" / "optimizer.pt").is_file()
    assert resumed.history == whole.history
    # Resumed again to its first length, the run takes that validation back: it is the 6-epoch run it began as.
    again = meta_train(longer, tmp_path / "cut", resume=tmp_path / "cut" / "resume.pt", progress=False)
    assert again.history == MetaTrainer(longer).run(progress=False).history


def _shift_validation(monkeypatch, epoch, shift):
    """Adds ``shift`` to the validation score of ``epoch`` (the others score as they are)."""
    real_validate = MetaTrainer.validate
    monkeypatch.setattr(MetaTrainer, "validate", lambda self: real_validate(self) + (shift if self.epoch == epoch else 0.0))


@pytest.mark.parametrize("shift", [100.0, -100.0], ids=["last-epoch-validation-was-not-the-best", "it-was-the-best"])
def test_a_finished_run_resumed_with_more_epochs_equals_a_run_started_with_them(tmp_path, monkeypatch, shift):
    # Epoch 3 is off the validation cadence (every 2): the 3-epoch run validates it only because it is its last.
    config = TrainConfig(epochs=3, optimizee_steps=2, unroll=2, val_every=2, checkpoint_every=1, **TINY)
    longer = dataclasses.replace(config, epochs=5)
    _shift_validation(monkeypatch, 3, shift)
    whole = meta_train(longer, tmp_path / "whole", progress=False)
    short = meta_train(config, tmp_path / "run", progress=False)
    assert short.history[-1]["epoch"] == 3 and "validation" in short.history[-1]
    assert (short.best_epoch == 3) == (shift < 0)
    resumed = meta_train(longer, tmp_path / "run", resume=tmp_path / "run" / "resume.pt", progress=False)
    assert [record["epoch"] for record in resumed.history if "validation" in record] == [2, 4, 5]
    assert resumed.history == whole.history
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == whole.history
    assert (resumed.best_score, resumed.best_epoch) == (whole.best_score, whole.best_epoch)
    for name, value in whole.rule.state_dict().items():
        assert torch.equal(value, resumed.rule.state_dict()[name]), name


def test_a_checkpoint_without_the_best_before_its_last_validation_keeps_that_validation_with_a_warning(tmp_path, monkeypatch):
    # A resume checkpoint written before l2l kept the best weights from before the last epoch's extra validation.
    config = TrainConfig(epochs=3, optimizee_steps=2, unroll=2, val_every=2, **TINY)
    _shift_validation(monkeypatch, 3, -100.0)
    meta_train(config, tmp_path, progress=False)
    payload = torch.load(tmp_path / "resume.pt", weights_only=True)
    del payload["progress"]["before_final_validation"]
    torch.save(payload, tmp_path / "resume.pt")
    with pytest.warns(UserWarning, match="validated epoch 3 only because it was its last.*cannot be undone"):
        resumed = meta_train(dataclasses.replace(config, epochs=4), tmp_path, resume=tmp_path / "resume.pt", progress=False)
    assert resumed.best_epoch == 3 and "validation" in resumed.history[2]


def test_resuming_with_fewer_epochs_than_the_checkpoint_finished_is_an_error_naming_both(tmp_path):
    config = TrainConfig(epochs=3, optimizee_steps=2, unroll=2, **TINY)
    meta_train(config, tmp_path, progress=False)
    written = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match=r"finished 3 epochs, but epochs asks for 2.*--epochs 3 or more"):
        meta_train(dataclasses.replace(config, epochs=2), tmp_path, resume=tmp_path / "resume.pt", progress=False)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == written  # nothing rewritten


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.update(train_config=None), "train_config is a NoneType, not a dict"),
    (lambda p: p.update(meta_optimizer=None), "meta_optimizer is a NoneType, not a dict"),
    (lambda p: p.update(epoch=-5), "epoch is -5, not a non-negative integer"),
    (lambda p: p["progress"].update(history={"a": 1}), "progress.history is not a list"),
    (lambda p: p["train_config"].update(meta_lr="fast"), "holds an invalid train_config"),
    (lambda p: p["rule"]["config"].update(hidden_size=8), "holds a rule .* that is not the one its train_config builds"),
    (lambda p: p.update(rng=None), "rng is a NoneType, not a dict"),
    (lambda p: p["rng"].update(batches=torch.zeros(3, dtype=torch.uint8)), r"has a damaged rng entry \(RuntimeError"),
    (lambda p: p["meta_optimizer"]["param_groups"][0].update(params=[0]), "has a damaged meta_optimizer entry"),
    (lambda p: p["progress"].update(best_score="low"), r"has a damaged progress.best_score entry \(ValueError"),
    (lambda p: p["progress"].pop("skipped"), r"has a damaged progress.skipped entry \(missing 'skipped'\)"),
    (lambda p: p["progress"]["before_final_validation"].pop("best_state_dict"),
     r"has a damaged progress.before_final_validation entry \(missing 'best_state_dict'\)"),
    (lambda p: p["progress"]["before_final_validation"]["best_state_dict"].clear(), "weights do not match"),
    # A NaN best score would never be beaten (no score is below NaN): the run could not keep better weights.
    (lambda p: p["progress"].update(best_score=float("nan")), r"damaged progress.best_score entry \(ValueError: nan is not"),
    (lambda p: p["progress"].update(skipped=-1), r"damaged progress.skipped entry \(ValueError: -1 is not a whole number from 0 up"),
    (lambda p: p["progress"].update(skipped=2.7), r"damaged progress.skipped entry \(ValueError: 2.7 is not a whole number"),
    (lambda p: p["progress"].update(consecutive_skipped=1), r"progress.consecutive_skipped entry \(ValueError: 1 is not a whole number from 0 to 0"),
    (lambda p: p["progress"].update(best_epoch=-2), r"damaged progress.best_epoch entry \(ValueError: -2 is not a whole number from -1 to 1"),
    (lambda p: p["progress"].update(best_epoch=True), r"damaged progress.best_epoch entry \(ValueError: True is not"),
    (lambda p: p["progress"]["history"].append("epoch 2"), r"damaged progress.history entry \(ValueError: item 1 is a str, not an epoch's record"),
], ids=["train-config", "meta-optimizer", "epoch", "history", "config-field", "rule", "rng", "rng-state", "adam-groups",
        "best-score", "skipped", "before-final", "before-final-weights", "best-score-nan", "skipped-negative",
        "skipped-fraction", "consecutive-above-skipped", "best-epoch-negative", "best-epoch-bool", "history-item"])
def test_a_damaged_resume_checkpoint_is_a_checkpoint_error(tmp_path, damage, message):
    meta_train(TrainConfig(epochs=1, **SMALL), tmp_path, progress=False)
    payload = torch.load(tmp_path / "resume.pt", weights_only=True)
    damage(payload)
    torch.save(payload, tmp_path / "resume.pt")
    with pytest.raises(CheckpointError, match=message):
        trainer = MetaTrainer(TrainConfig(epochs=2, **SMALL), tmp_path, warm_start=False)
        trainer.restore(tmp_path / "resume.pt")


def test_a_list_given_in_python_equals_the_config_read_back_from_json():
    config = TrainConfig(loss_weights=[1.0, 2.0, 0.0, 1.0, 1.0], split=["conv", "fc"], **SMALL)
    assert config.loss_weights == (1.0, 2.0, 0.0, 1.0, 1.0) and config.split == ("conv", "fc")
    assert TrainConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("text, found", [("[]", "an array"), ("3", "a number"), ('"task"', "a string"), ("null", "null")])
def test_a_json_config_that_is_not_an_object_is_a_config_error_naming_what_it_holds(text, found):
    for read in (TrainConfig.from_json, BenchConfig.from_json):
        with pytest.raises(ConfigError, match=f"must be a JSON object of its fields, found {found}"):
            read(text)
    with pytest.raises(ConfigError, match=r"TrainConfig JSON is not valid JSON: Expecting"):
        TrainConfig.from_json("{")


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:", "gpu"])
def test_malformed_devices_are_refused_in_the_config(device):
    with pytest.raises(ConfigError, match=r"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        TrainConfig(device=device)


# -- exact behaviour of an epoch, against hand-written references --------------------------------
TINY = dict(instances=3, val_problems=2, device="cpu", task_options={"dim": 3})


def _record_truncations(monkeypatch, trainer):
    """Per truncation: (weights before it, length, meta-loss, applied meta-gradient); and the epoch's tasks."""
    seen, tasks_seen = [], []
    original = trainer._eager_truncation

    def recording(tasks):
        tasks_seen.append(tasks[0])
        truncate = original(tasks)

        def wrapped(carries, length):
            before = {key: value.clone() for key, value in trainer.rule.state_dict().items()}
            result, carries = truncate(carries, length)
            seen.append((before, length, result.meta_loss.item(), [p.grad.clone() for p in trainer.rule.parameters()]))
            return result, carries

        return wrapped

    monkeypatch.setattr(trainer, "_eager_truncation", recording)
    return seen, tasks_seen


def test_an_epoch_computes_the_meta_loss_and_gradient_of_a_hand_written_reference(monkeypatch):
    from l2l.optimizers.base import detach_state

    # 7 steps unrolled 3 at a time: truncations of 3, 3 and 1 steps, the linear weights laid over each one's length.
    config = TrainConfig(epochs=1, optimizee_steps=7, unroll=3, loss_weights="linear", clip_grad_norm=1e9, **TINY)
    trainer = MetaTrainer(config)
    seen, tasks_seen = _record_truncations(monkeypatch, trainer)
    epoch_loss = trainer.train_epoch().item()
    assert [length for _, length, _, _ in seen] == [3, 3, 1]
    hand_weights = {3: [1 / 3, 2 / 3, 1.0], 1: [1.0]}
    task, rule = tasks_seen[0], copy.deepcopy(trainer.rule)
    params = task.init_params()
    start_params = params.clone().requires_grad_(True)
    grad = torch.autograd.grad(task.loss(start_params).sum(), start_params)[0]
    state = rule.init_state(params.numel())
    references = []
    for before, length, meta_loss, applied in seen:
        rule.load_state_dict(before)  # the weights this truncation ran with (Adam stepped after the previous one)
        reference = torch.zeros(())
        for weight in hand_weights[length]:
            update, state = rule(grad.reshape(-1), state)
            params = params + update.view(params.shape)
            loss = task.loss(params)
            grad = torch.autograd.grad(loss.sum(), params, retain_graph=True)[0].detach()  # first order
            reference = reference + weight * loss.mean()
        expected = torch.autograd.grad(reference, list(rule.parameters()))
        assert meta_loss == pytest.approx(reference.item(), rel=1e-5)
        for got, want in zip(applied, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        references.append(reference.item())
        params, state = params.detach(), detach_state(state)  # the truncation
    assert epoch_loss == pytest.approx(sum(references) / len(references), rel=1e-5)


def _poison_clipping(monkeypatch, poisoned_calls):
    """Makes the meta-gradient infinite (the meta-loss stays finite) at the given 1-based clip calls."""
    real = torch.nn.utils.clip_grad_norm_
    calls = []

    def clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls.append(len(calls) + 1)
        if calls[-1] in poisoned_calls:
            parameters[0].grad.view(-1)[0] = math.inf
        return real(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return calls


def test_a_non_finite_meta_gradient_with_a_finite_meta_loss_is_skipped(monkeypatch):
    trainer = MetaTrainer(TrainConfig(epochs=1, optimizee_steps=4, unroll=2, **TINY))
    before = {key: value.clone() for key, value in trainer.rule.state_dict().items()}
    _poison_clipping(monkeypatch, {1})
    assert math.isnan(trainer.train_epoch().item())  # the first step skipped, the epoch abandoned
    assert (trainer.skipped, trainer.consecutive_skipped) == (1, 1)
    for name, value in trainer.rule.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_max_nonfinite_counts_skipped_steps_in_a_row_only(monkeypatch):
    # Every epoch steps once, then skips its second truncation: 3 skips, never 2 in a row.
    trainer = MetaTrainer(TrainConfig(epochs=3, optimizee_steps=4, unroll=2, max_nonfinite=2, val_every=10, **TINY))
    calls = _poison_clipping(monkeypatch, {2, 4, 6})
    trainer.run(progress=False)
    assert len(calls) == 6 and (trainer.skipped, trainer.consecutive_skipped) == (3, 1)
    # Each epoch's meta-loss is its first truncation's alone: the history says that a step was skipped.
    assert all(record["meta_loss"] is not None and record["skipped"] == 1 for record in trainer.history)


def test_validation_scores_the_mean_loss_over_the_last_tenth_of_the_steps():
    from l2l.meta.unroll import run

    trainer = MetaTrainer(TrainConfig(epochs=1, optimizee_steps=20, unroll=5, **TINY))
    losses, _ = run(trainer.rule, trainer.validation_task, 20)  # [21, K], the initial loss first
    assert losses.shape[0] == 21
    assert trainer.validate() == pytest.approx(losses[-2:].double().mean().item(), rel=1e-6)  # steps 19 and 20


def _record_meta_learning_rates(monkeypatch, trainer):
    """The learning rate of every meta-step ``trainer`` takes from now on."""
    rates = []
    step = trainer.meta_optimizer.step

    def recording_step(*args, **kwargs):
        rates.append(trainer.meta_optimizer.param_groups[0]["lr"])
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.meta_optimizer, "step", recording_step)
    return rates


@pytest.mark.parametrize("warm_start", [False, True], ids=["fresh", "warm-start"])
def test_the_cosine_schedule_sets_each_epochs_meta_learning_rate(monkeypatch, tmp_path, warm_start):
    from l2l.checkpoint import save_use_checkpoint
    from l2l.meta.train import build_learned_rule

    # A warm start's validation adds an epoch-0 record to the history; the schedule follows the epochs trained.
    init = str(save_use_checkpoint(tmp_path / "init.pt", build_learned_rule(TrainConfig(seed=3)), {})) if warm_start else None
    trainer = MetaTrainer(TrainConfig(epochs=3, optimizee_steps=2, unroll=2, meta_lr=1e-2, meta_lr_schedule="cosine",
                                      val_every=10, init_from=init, **TINY))
    rates = _record_meta_learning_rates(monkeypatch, trainer)
    trainer.run(progress=False)
    # 1e-2 * (0.1 + 0.45 * (1 + cos(pi * e / 2))) for epochs e = 0, 1, 2
    assert rates == pytest.approx([1e-2, 5.5e-3, 1e-3], rel=1e-12)


def test_a_resume_with_more_epochs_re_times_the_rest_of_the_cosine_decay(monkeypatch, tmp_path):
    from l2l.meta.train import meta_learning_rate

    config = TrainConfig(epochs=3, optimizee_steps=2, unroll=2, meta_lr=1e-2, meta_lr_schedule="cosine", val_every=10,
                         checkpoint_every=2, **TINY)
    MetaTrainer(config, tmp_path).run(progress=False)
    longer = dataclasses.replace(config, epochs=5)
    resumed = MetaTrainer(longer, tmp_path, warm_start=False)
    resumed.restore(tmp_path / "resume.pt")
    rates = _record_meta_learning_rates(monkeypatch, resumed)
    resumed.run(progress=False)
    assert rates == pytest.approx([meta_learning_rate(longer, epoch) for epoch in (3, 4)], rel=1e-12)
    assert rates[-1] == pytest.approx(1e-3, rel=1e-12)  # a tenth of meta_lr at the new last epoch


def test_the_history_is_synced_and_replaced_atomically(tmp_path, monkeypatch):
    import os
    import stat

    trainer = MetaTrainer(TrainConfig(epochs=1, optimizee_steps=2, unroll=2, **TINY), tmp_path)
    trainer.history.append({"epoch": 1, "meta_loss": 1.0})
    trainer.save()
    written = (tmp_path / "history.json").read_text()
    trainer.history.append({"epoch": 2, "meta_loss": 2.0})
    real_fsync, synced = os.fsync, []

    def cut_short_at_the_history(descriptor):  # optimizer.pt, history.json and resume.pt are written in that order
        if stat.S_ISDIR(os.fstat(descriptor).st_mode):  # the directory, synced after each rename
            return real_fsync(descriptor)
        synced.append(descriptor)
        if len(synced) == 2:
            os.ftruncate(descriptor, os.fstat(descriptor).st_size // 2)
            raise OSError("disk full")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", cut_short_at_the_history)
    with pytest.raises(OSError, match="disk full"):
        trainer.save()
    assert (tmp_path / "history.json").read_text() == written
    assert sorted(path.name for path in tmp_path.iterdir()) == ["history.json", "optimizer.pt", "resume.pt"]  # no temporary


@pytest.mark.parametrize("change", [
    {"seed": 1}, {"loss_weights": "final"}, {"clip_grad_norm": 2.0}, {"meta_lr_schedule": "cosine"}, {"instances": 16},
    {"unroll": 2}, {"val_every": 3}, {"val_problems": 8}, {"second_order": True}, {"hidden_size": 8}, {"task_options": {"dim": 4}},
])
def test_resume_refuses_every_setting_that_changes_what_is_computed(change):
    from l2l.meta.train import check_resumable

    saved = TrainConfig(epochs=2, **SMALL)
    with pytest.raises(CheckpointError, match=f"{next(iter(change))}: checkpoint"):
        check_resumable(saved, dataclasses.replace(saved, **change))
    check_resumable(saved, dataclasses.replace(saved, epochs=9, max_nonfinite=3, checkpoint_every=7, kernel="reference",
                                               cuda_graphs="off", accumulate=2))


@pytest.mark.parametrize("spelled", [{"instances": 128}, {"optimizee_steps": 100}, {"unroll": 20}, {"task_options": {"dim": 10}},
                                     {"optimizee_steps": 100, "unroll": 20, "instances": 128, "task_options": {"dim": 10}}])
def test_resume_compares_effective_values_so_a_family_default_spelled_out_is_no_change(spelled):
    from l2l.meta.train import check_resumable

    saved = TrainConfig(epochs=2, device="cpu")  # the quadratic family's defaults: dim 10, 100 steps, unroll 20, K 128
    check_resumable(saved, dataclasses.replace(saved, **spelled))
    check_resumable(dataclasses.replace(saved, **spelled), saved)
    with pytest.raises(CheckpointError, match=r"instances: checkpoint 128, asked 64"):
        check_resumable(saved, dataclasses.replace(saved, **{**spelled, "instances": 64}))


@pytest.mark.parametrize("saved_weights, asked_weights, unroll, steps", [
    ("uniform", (1.0,) * 5, 5, 10),
    ("linear", (0.2, 0.4, 0.6, 0.8, 1.0), 5, 10),  # whole truncations: only the 5-step weights are used
    ("final", (0, 0, 0, 0, 1), 5, 10),
    ("final", "uniform", 1, 10),  # one-step truncations weigh their one loss by 1 either way
])
def test_resume_compares_the_loss_weights_each_truncation_uses_not_their_spelling(saved_weights, asked_weights, unroll, steps):
    from l2l.meta.train import check_resumable

    saved = TrainConfig(unroll=unroll, optimizee_steps=steps, loss_weights=saved_weights, device="cpu")
    asked = dataclasses.replace(saved, loss_weights=asked_weights)
    check_resumable(saved, asked)
    check_resumable(asked, saved)
    assert torch.equal(loss_weight_table(saved, steps, unroll)[unroll - 1], loss_weight_table(asked, steps, unroll)[unroll - 1])
    doubled = dataclasses.replace(saved, loss_weights=tuple(2 * w for w in loss_weights(saved, unroll).tolist()))
    with pytest.raises(CheckpointError, match=rf"loss_weights: checkpoint {re.escape(repr(saved_weights))}, asked \("):
        check_resumable(saved, doubled)  # twice the meta-loss is another run


def test_resume_compares_the_weights_of_a_shorter_last_truncation_too():
    from l2l.meta.train import check_resumable

    # Over 12 steps unrolled 5 at a time the last truncation has 2 steps; 'uniform' and 'linear' differ there as everywhere,
    # and a changed horizon is named as such.
    saved = TrainConfig(unroll=5, optimizee_steps=12, device="cpu")
    with pytest.raises(CheckpointError, match="loss_weights: checkpoint 'uniform', asked 'linear'"):
        check_resumable(saved, dataclasses.replace(saved, loss_weights="linear"))
    check_resumable(saved, dataclasses.replace(saved, loss_weights="uniform"))


def test_resume_takes_two_spellings_of_one_init_from_checkpoint_as_the_same(tmp_path, monkeypatch):
    from l2l.checkpoint import shipped_checkpoints
    from l2l.meta.train import check_resumable

    monkeypatch.chdir(tmp_path)
    saved = TrainConfig(epochs=2, device="cpu", init_from="first/optimizer.pt")  # the file may be gone by now
    for spelling in ("./first/optimizer.pt", str(tmp_path / "first" / "optimizer.pt"), "first/../first/optimizer.pt"):
        check_resumable(saved, dataclasses.replace(saved, init_from=spelling))
    shipped = dataclasses.replace(saved, init_from="quadratic")
    check_resumable(shipped, dataclasses.replace(saved, init_from=str(shipped_checkpoints()["quadratic"])))
    with pytest.raises(CheckpointError, match="init_from: checkpoint"):
        check_resumable(saved, dataclasses.replace(saved, init_from="second/optimizer.pt"))
    with pytest.raises(CheckpointError, match="init_from: checkpoint"):
        check_resumable(saved, dataclasses.replace(saved, init_from=None))


@pytest.mark.parametrize("build, message", [
    (lambda: TrainConfig.from_dict({"task": "quadratic", "unrol": 5}), r"unknown TrainConfig field\(s\): unrol"),
    (lambda: TrainConfig(loss_weights=(1.0, 2.0), unroll=3, optimizee_steps=6), "loss_weights has 2 entries but the unroll has 3 steps"),
    (lambda: TrainConfig(loss_weights=(1.0, math.inf)), "loss_weights must be non-negative finite numbers"),
    (lambda: TrainConfig(clip_grad_norm=0.0), "clip_grad_norm must be a positive finite number, got 0.0"),
    (lambda: TrainConfig(unroll=6, optimizee_steps=5), r"unroll \(6\) must not exceed optimizee_steps \(5\)"),
])
def test_invalid_training_settings_are_config_errors(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
    assert TrainConfig(unroll=5, optimizee_steps=5).unroll == 5  # one truncation of the whole horizon


def test_checkpoints_and_validations_follow_their_cadence_and_the_last_epoch(monkeypatch):
    trainer = MetaTrainer(TrainConfig(epochs=5, checkpoint_every=2, val_every=3, optimizee_steps=2, unroll=2, **TINY))
    saved = []
    monkeypatch.setattr(trainer, "save", lambda: saved.append(trainer.epoch))
    trainer.run(progress=False)
    assert saved == [2, 4, 5]
    assert [record["epoch"] for record in trainer.history if "validation" in record] == [3, 5]


def _refuse_non_finite_json(text):
    def refuse(constant):
        raise ValueError(f"history.json holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_a_rule_that_never_validates_finite_has_no_best_epoch_and_writes_strict_json(tmp_path):
    from l2l.checkpoint import load_use_checkpoint

    # Every update makes these losses NaN, so every validation score is infinite: none is an improvement.
    config = TrainConfig(task=NaNAfterFamily.name, epochs=2, max_nonfinite=100, **{**SMALL, "val_every": 1})
    with pytest.warns(RuntimeWarning, match=r"no validation score was finite .*optimizer.pt holds the weights training "
                                            r"started from \(its fresh initialisation\), not trained ones"):
        result = meta_train(config, tmp_path, progress=False)
    history = _refuse_non_finite_json((tmp_path / "history.json").read_text())
    assert [(record["epoch"], record["validation"]) for record in history] == [(1, None), (2, None)]
    assert (result.best_epoch, result.best_score) == (-1, math.inf)
    metadata = load_use_checkpoint(tmp_path / "optimizer.pt").metadata
    assert (metadata["best_epoch"], metadata["validation_score"]) == (-1, None)


def test_validation_instances_are_none_of_the_training_instances():
    # As many validation as training instances: drawn from one stream, the two sets would be equal.
    trainer = MetaTrainer(TrainConfig(epochs=1, optimizee_steps=2, unroll=2, instances=4, val_problems=4, device="cpu"))
    generator = torch.Generator()
    generator.set_state(trainer.instance_generator.get_state())
    first_epoch = trainer.family.sample(trainer.instances, generator)
    held_out = [*trainer.validation_task.W, *trainer.validation_task.y]
    assert not any(torch.equal(a, b) for a in held_out for b in [*first_epoch.W, *first_epoch.y])



def _stop_at(epoch):
    def stop(trainer):
        if trainer.epoch == epoch:
            raise KeyboardInterrupt

    return stop


def test_a_run_written_on_cuda_resumes_on_the_cpu(tmp_path):
    # A CUDA generator's state is 16 bytes (Philox seed and offset), the CPU's 5056: a run trained with
    # --device auto on a GPU node and resumed on a CPU machine was refused as a "damaged rng entry".
    from l2l.seeding import state_seed

    config = TrainConfig(task=NoisyQuadraticFamily.name, epochs=2, checkpoint_every=1, optimizee_steps=2, unroll=2, **TINY)
    with pytest.raises(KeyboardInterrupt):
        MetaTrainer(config, tmp_path).run(progress=False, on_epoch=_stop_at(1))
    payload = torch.load(tmp_path / "resume.pt", weights_only=True)
    cuda_state = torch.arange(16, dtype=torch.uint8)  # the form of torch.cuda's Generator.get_state()
    payload["rng"]["batches"] = cuda_state
    torch.save(payload, tmp_path / "resume.pt")
    resumed = MetaTrainer(config, tmp_path, warm_start=False)
    resumed.restore(tmp_path / "resume.pt")
    # The minibatch stream continues from a seed drawn from the saved state (the device types draw differently anyway).
    assert torch.equal(resumed.batch_generator.get_state(), torch.Generator().manual_seed(state_seed(cuda_state)).get_state())
    assert resumed.instance_generator.get_state().equal(payload["rng"]["instances"])  # the CPU stream continues exactly
    resumed.run(progress=False)
    assert resumed.epoch == 2


def test_a_generator_of_another_device_type_is_seeded_from_the_saved_state():
    from l2l.meta.train import continue_stream
    from l2l.seeding import state_seed

    class CudaLike:  # a CUDA generator's state size, on a machine without CUDA
        def __init__(self):
            self.seeded = None

        def get_state(self):
            return torch.zeros(16, dtype=torch.uint8)

        def set_state(self, state):
            raise RuntimeError("RNG state is wrong size")

        def manual_seed(self, seed):
            self.seeded = seed

    cpu_state = torch.Generator().manual_seed(5).get_state()
    generator = CudaLike()
    continue_stream(generator, cpu_state)  # a CPU run resumed on CUDA
    assert generator.seeded == state_seed(cpu_state)
    same = torch.Generator()
    continue_stream(same, cpu_state)  # the same device type continues bit for bit
    assert torch.equal(same.get_state(), cpu_state)
    with pytest.raises(RuntimeError):  # a state of neither size is damage, not another device
        continue_stream(torch.Generator(), torch.zeros(3, dtype=torch.uint8))


def test_an_output_directory_starting_with_a_tilde_means_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    result = meta_train(TrainConfig(epochs=1, **SMALL), "~/run", progress=False)
    assert result.resume_checkpoint == tmp_path / "home" / "run" / "resume.pt" and result.resume_checkpoint.is_file()
    assert not (tmp_path / "~").exists()
    resumed = meta_train(TrainConfig(epochs=2, init_from="~/run/optimizer.pt", **SMALL), "~/warm", progress=False)
    assert resumed.use_checkpoint.is_file()
    assert meta_train(TrainConfig(epochs=2, **SMALL), "~/run", resume="~/run/resume.pt", progress=False).epochs == 2


@pytest.mark.parametrize("damage, message", [
    # Loaded as they were, these failed only at the first meta-step, as a bare broadcast error...
    (lambda state: state.update(exp_avg=torch.zeros(1)), r"exp_avg of weight_ih_l0 has shape \(1,\), expected \(80, 2\)"),
    (lambda state: state.pop("exp_avg_sq"), r"state of weight_ih_l0 lacks exp_avg_sq"),
    # ... or trained on, turning the rule's weights into NaN with every meta-gradient finite.
    (lambda state: state["exp_avg"].view(-1)[0].fill_(float("nan")), "exp_avg of weight_ih_l0 holds NaN or infinite values"),
    (lambda state: state["exp_avg_sq"].fill_(-1.0), "exp_avg_sq of weight_ih_l0 holds negative values"),
    (lambda state: state.update(step=torch.tensor(float("inf"))), r"step of weight_ih_l0 is inf, not a count"),
], ids=["shape", "missing", "nan", "negative", "step"])
def test_a_damaged_meta_optimizer_state_is_refused_on_resume_naming_the_tensor(tmp_path, damage, message):
    meta_train(TrainConfig(epochs=1, **SMALL), tmp_path, progress=False)
    payload = torch.load(tmp_path / "resume.pt", weights_only=True)
    damage(payload["meta_optimizer"]["state"][0])
    torch.save(payload, tmp_path / "resume.pt")
    trainer = MetaTrainer(TrainConfig(epochs=2, **SMALL), tmp_path, warm_start=False)
    with pytest.raises(CheckpointError, match=rf"has a damaged meta_optimizer entry \(ValueError: Adam {message}"):
        trainer.restore(tmp_path / "resume.pt")


def test_the_progress_bar_does_not_flood_a_log_file(capsys):
    # Piped to a file (a cluster job's log), the bar was redrawn twice per epoch: some 2,000 lines for the quick start.
    import time

    config = TrainConfig(task="quadratic", epochs=8, instances=4, optimizee_steps=4, unroll=2, val_every=4, val_problems=4,
                         device="cpu")
    MetaTrainer(config, None).run(progress=True, on_epoch=lambda trainer: time.sleep(0.12))
    draws = capsys.readouterr().err.replace("\r", "\n").split("\n")
    bars = [line for line in draws if line.startswith("meta-train quadratic")]
    assert len(bars) <= 3, bars  # the start and the final line, which the log keeps
    assert "8/8" in bars[-1] and "best_val=" in bars[-1]


def test_training_benchmarking_and_the_drop_in_follow_their_seeds_alone_and_leave_the_global_rng_alone():
    # The README's promise: every stream derives from the run's seed, and the caller's torch RNG is
    # neither read (the results do not depend on it) nor moved; dropout exercises the seeded layers.
    from torch import nn

    from l2l import LearnedOptimizer, benchmark
    from l2l.tasks import ModuleFamily, SupervisedData

    from helpers import TinyMLPFamily

    data = TinyMLPFamily().data("cpu")
    dropout = ModuleFamily(lambda: nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Dropout(0.5), nn.Linear(6, 3)),
                           lambda device: SupervisedData(*data), batch_size=4)

    def everything():
        config = TrainConfig(task=TinyMLPFamily.name, epochs=1, optimizee_steps=2, unroll=1, instances=2, val_problems=2,
                             val_every=1, device="cpu")
        rule = meta_train(config, progress=False).rule
        report = benchmark(dropout, {"lstm": rule}, baselines=("sgd",), steps=2, problems=2, tune_problems=2,
                           lr_grid=(0.1,), seed=0, device=torch.device("cpu"))
        weight = nn.Parameter(torch.linspace(-1, 1, 5))
        optimizer = LearnedOptimizer([weight], rule)
        for _ in range(2):
            optimizer.zero_grad()
            weight.pow(2).sum().backward()
            optimizer.step()
        curves = {name: result["curve_mean"] for name, result in report["results"].items()}
        return rule.state_dict(), curves, weight.detach().clone()

    outcomes = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        outcomes.append(everything())
        assert torch.equal(torch.random.get_rng_state(), before)
    (weights, curves, stepped), (weights_again, curves_again, stepped_again) = outcomes
    assert all(torch.equal(weights[name], weights_again[name]) for name in weights)
    assert curves == curves_again and torch.equal(stepped, stepped_again)


def test_weights_made_non_finite_by_a_meta_step_stop_training_before_they_are_written(tmp_path):
    # Adam with a finite meta-gradient can still write NaN or inf (an extreme learning rate or moment): every later step
    # would be skipped as a non-finite meta-loss, and the checkpoints would hold weights that no resume can load.
    config = TrainConfig(epochs=3, optimizee_steps=4, unroll=2, checkpoint_every=1, max_nonfinite=100, **TINY)
    trainer = MetaTrainer(config, tmp_path)
    real_step, steps = trainer.meta_optimizer.step, []

    def step(*args, **kwargs):
        result = real_step(*args, **kwargs)
        steps.append(1)
        if len(steps) == 3:  # the first meta-step of epoch 2
            with torch.no_grad():
                trainer.rule.weight_out.view(-1)[0] = math.nan
        return result

    trainer.meta_optimizer.step = step
    with pytest.raises(NonFiniteError, match=r"the meta-optimizer's steps of epoch 2 made the learned optimizer's weight_out "
                                             r"NaN or infinite, .*not written.*Lower --meta-lr"):
        trainer.run(progress=False)
    resumed = MetaTrainer(dataclasses.replace(config, epochs=4))
    resumed.restore(tmp_path / "resume.pt")  # epoch 1's, which loads
    assert resumed.epoch == 1 and all(torch.isfinite(value).all() for value in resumed.rule.state_dict().values())
