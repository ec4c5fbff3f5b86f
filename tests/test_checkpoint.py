"""Checkpoints: round trips, atomic writes, and clear errors for damaged or mismatched files."""

import os
import stat

import pytest
import torch

from l2l.checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_write,
    load_optimizer,
    load_resume_checkpoint,
    load_use_checkpoint,
    save_use_checkpoint,
)
from l2l.optimizers import CoordinateWiseLSTM


@pytest.fixture
def saved(tmp_path, lstm):
    return save_use_checkpoint(tmp_path / "opt.pt", lstm, {"task": "quadratic"})


def test_use_checkpoint_round_trip(saved, lstm):
    loaded = load_use_checkpoint(saved)
    assert loaded.metadata["task"] == "quadratic"
    assert set(loaded.metadata["versions"]) == {"l2l", "torch"}
    for name, value in lstm.state_dict().items():
        assert torch.equal(loaded.rule.state_dict()[name], value)
    grad = torch.randn(9)
    torch.testing.assert_close(loaded.rule(grad, loaded.rule.init_state(9))[0], lstm(grad, lstm.init_state(9))[0])


def test_corrupt_file(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="corrupt, truncated, or not an l2l checkpoint"):
        load_optimizer(path)


def test_a_refused_file_is_never_met_with_advice_to_load_it_unsafely(tmp_path, recwarn):
    import pickle

    plain_pickle, foreign_class = tmp_path / "plain.pt", tmp_path / "foreign.pt"
    plain_pickle.write_bytes(pickle.dumps({"format": "l2l-use"}, protocol=4))
    torch.save({"format": "l2l-use", "rule": Payload()}, foreign_class)  # a call of os.system
    for path, reason in ((plain_pickle, "Unsupported operand"), (foreign_class, f"it holds a {os.system.__module__}.system, which l2l never writes")):
        with pytest.raises(CheckpointError) as error:
            load_optimizer(path)
        message = str(error.value)
        assert reason in message
        for advice in ("weights_only", "safe_globals", "trust", "\x1b"):  # torch's advice (and its terminal bold)
            assert advice not in message
    assert not [w for w in recwarn if "pickle protocol" in str(w.message)]


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_optimizer(saved)


def test_a_bit_flipped_in_a_weight_is_refused_not_loaded_as_another_weight(saved, lstm):
    # torch.load does not check the archive's CRCs: the flipped weight would load silently.
    weight = lstm.state_dict()["weight_out"].contiguous().numpy().tobytes()
    data = bytearray(saved.read_bytes())
    at = data.find(weight)
    assert at > 0
    data[at] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"opt.pt is corrupt: a record fails its CRC check .*copy it again"):
        load_optimizer(saved)


def test_a_checkpoint_saved_without_crcs_still_loads(tmp_path, lstm):
    torch.serialization.set_crc32_options(False)
    try:
        saved = save_use_checkpoint(tmp_path / "opt.pt", lstm, {"task": "quadratic"})
    finally:
        torch.serialization.set_crc32_options(True)
    assert torch.equal(load_optimizer(saved).state_dict()["weight_out"], lstm.state_dict()["weight_out"])


class Payload:
    """An arbitrary object: loading must refuse to unpickle it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "l2l-use", "format_version": 1, "rule": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused to unpickle an object that is not plain data"):
        load_optimizer(path)


def test_wrong_kind_of_checkpoint(saved):
    with pytest.raises(CheckpointError, match="is a 'l2l-use' checkpoint, expected 'l2l-resume'"):
        load_resume_checkpoint(saved)


def test_not_an_l2l_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an l2l checkpoint"):
        load_optimizer(path)


def test_weights_mismatched_with_config(tmp_path, lstm):
    path = save_use_checkpoint(tmp_path / "opt.pt", lstm, {})
    payload = torch.load(path, weights_only=True)
    payload["rule"]["config"]["hidden_size"] = 10
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="weights do not match its optimizer config .*size mismatch for weight_ih_l0"):
        load_optimizer(path)


def test_unknown_rule_class(tmp_path, lstm):
    path = save_use_checkpoint(tmp_path / "opt.pt", lstm, {})
    payload = torch.load(path, weights_only=True)
    payload["rule"]["class"] = "TransformerOptimizer"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="unknown learned optimizer 'TransformerOptimizer'"):
        load_optimizer(path)


def _damaged(tmp_path, lstm, damage):
    path = save_use_checkpoint(tmp_path / "opt.pt", lstm, {})
    payload = torch.load(path, weights_only=True)
    damage(payload)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, lstm, value):
    # Loaded, a NaN weight would make every parameter it updates NaN with no warning at all.
    path = _damaged(tmp_path, lstm, lambda payload: payload["state_dict"]["weight_ih_l0"].view(-1)[3].fill_(value))
    with pytest.raises(CheckpointError, match="corrupt: weights weight_ih_l0 hold NaN or infinite values"):
        load_optimizer(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda payload: payload["rule"].pop("config"), "corrupt: its optimizer entry has no config mapping"),
        (lambda payload: payload.update(state_dict=[1, 2]), "corrupt: its weights are not a mapping of names to tensors"),
        (lambda payload: payload.update(metadata=None), "corrupt: its metadata is a NoneType, not a mapping"),
    ],
    ids=["no-config", "weights-not-a-mapping", "metadata-not-a-mapping"],
)
def test_malformed_entries_name_the_damage(tmp_path, lstm, damage, message):
    with pytest.raises(CheckpointError, match=message):
        load_optimizer(_damaged(tmp_path, lstm, damage))


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file .*shipped: .*quadratic"):
        load_optimizer(tmp_path / "nothing.pt")


def test_atomic_save_keeps_the_old_file_when_writing_fails(saved, monkeypatch):
    before = saved.read_bytes()

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"format": "x"}, saved)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no temporary left behind


def test_shipped_quadratic_checkpoint_loads():
    rule = load_optimizer("quadratic")
    assert isinstance(rule, CoordinateWiseLSTM)


def test_another_format_version_is_refused(tmp_path, lstm):
    path = _damaged(tmp_path, lstm, lambda payload: payload.update(format_version=2))
    with pytest.raises(CheckpointError, match="has format version 2; this l2l reads version 1"):
        load_optimizer(path)


def test_checkpoints_are_readable_by_others(saved):
    assert saved.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


@pytest.mark.parametrize("epoch", [True, 1.0, -1])
def test_a_resume_checkpoint_with_an_epoch_that_is_not_a_count_is_refused(tmp_path, epoch):
    from l2l.checkpoint import RESUME_KEYS, save_resume_checkpoint

    payload = {key: {} for key in RESUME_KEYS}
    payload.update(epoch=epoch, progress={"history": []})
    path = save_resume_checkpoint(tmp_path / "resume.pt", payload)
    with pytest.raises(CheckpointError, match=f"epoch is {epoch!r}, not a non-negative integer"):
        load_resume_checkpoint(path)
    payload["epoch"] = 3
    assert load_resume_checkpoint(save_resume_checkpoint(path, payload))["epoch"] == 3


def test_an_incomplete_resume_checkpoint_names_what_is_missing(tmp_path):
    from l2l.checkpoint import RESUME_KEYS, save_resume_checkpoint

    path = save_resume_checkpoint(tmp_path / "resume.pt", {key: {} for key in RESUME_KEYS} | {"epoch": 0})
    payload = torch.load(path, weights_only=True)
    del payload["rng"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="is incomplete: missing rng"):
        load_resume_checkpoint(path)


def test_atomic_save_syncs_the_whole_file_then_renames_it_from_beside_the_target(tmp_path, monkeypatch):
    # Unsynced, a power cut after the rename can leave an empty or partial file under the
    # checkpoint's name; a temporary on another filesystem could not be renamed over it atomically.
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        status = os.fstat(descriptor)
        events.append(("fsync directory",) if stat.S_ISDIR(status.st_mode) else ("fsync", status.st_size))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", os.path.dirname(source), target))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    # A write smaller than the file object's buffer reaches the file only when flushed.
    path = atomic_write(tmp_path / "history.json", lambda handle: handle.write(b"[1, 2]"))
    assert path.read_bytes() == b"[1, 2]"
    # The directory is synced after the rename, or a power cut could undo the rename.
    assert events == [("fsync", 6), ("replace", str(tmp_path), path), ("fsync directory",)]
    events.clear()
    path = atomic_save({"format": "x", "weights": torch.zeros(4096)}, tmp_path / "c.pt")
    assert events == [("fsync", path.stat().st_size), ("replace", str(tmp_path), path), ("fsync directory",)]


def test_weights_missing_a_tensor_are_refused_naming_it(tmp_path, lstm):
    path = _damaged(tmp_path, lstm, lambda payload: payload["state_dict"].pop("weight_ih_l0"))
    with pytest.raises(CheckpointError, match=r"weights do not match its optimizer config .*Missing key\(s\).*weight_ih_l0"):
        load_optimizer(path)


def test_a_resume_payload_without_every_field_is_never_written(tmp_path):
    from l2l.checkpoint import RESUME_KEYS, save_resume_checkpoint

    with pytest.raises(ValueError, match="resume payload lacks rng"):
        save_resume_checkpoint(tmp_path / "resume.pt", {key: {} for key in RESUME_KEYS if key != "rng"})
    assert list(tmp_path.iterdir()) == []


def test_a_file_given_by_path_wins_over_a_shipped_checkpoint_of_that_name(tmp_path, monkeypatch, lstm):
    monkeypatch.chdir(tmp_path)
    save_use_checkpoint(tmp_path / "quadratic", lstm, {"task": "mine"})
    assert load_use_checkpoint("quadratic").metadata["task"] == "mine"


def test_a_checkpoint_path_starting_with_a_tilde_means_the_home_directory(tmp_path, monkeypatch, lstm):
    # Not a folder named '~' under the working directory: what a quoted "~/runs/q" or a config file's
    # init_from means, as it does for the data directory.
    from l2l.checkpoint import RESUME_KEYS, save_resume_checkpoint
    from l2l.torch_optim import LearnedOptimizer

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    save_use_checkpoint("~/runs/optimizer.pt", lstm, {"task": "mine"})
    save_resume_checkpoint("~/runs/resume.pt", {key: {} for key in RESUME_KEYS} | {"epoch": 0, "progress": {"history": []}})
    assert sorted(p.name for p in (tmp_path / "home" / "runs").iterdir()) == ["optimizer.pt", "resume.pt"]
    assert not (tmp_path / "~").exists()
    assert load_use_checkpoint("~/runs/optimizer.pt").metadata["task"] == "mine"
    assert load_resume_checkpoint("~/runs/resume.pt")["epoch"] == 0
    LearnedOptimizer([torch.nn.Parameter(torch.zeros(3))], "~/runs/optimizer.pt")
    with pytest.raises(CheckpointError, match="no checkpoint file '~no-such-user-l2l/optimizer.pt'"):
        load_optimizer("~no-such-user-l2l/optimizer.pt")  # an unknown user's ~ is left as written, not a crash


def _unreadable(monkeypatch, path):
    """Makes ``path`` unreadable, also to root (whom chmod does not stop)."""
    import pathlib

    path.chmod(0)
    real_open = pathlib.Path.open

    def open_(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_)


def test_an_unreadable_checkpoint_is_named_as_such_not_as_corrupt(saved, monkeypatch):
    # A file on a shared disk without read permission is intact: "corrupt" would have it deleted.
    _unreadable(monkeypatch, saved)
    with pytest.raises(CheckpointError) as error:
        load_optimizer(saved)
    message = str(error.value)
    assert f"checkpoint {saved} cannot be opened: Permission denied" in message and "chmod" in message
    assert "corrupt" not in message


def test_an_empty_checkpoint_says_it_is_empty(tmp_path):
    (tmp_path / "resume.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"resume.pt is empty \(0 bytes\): its write was cut short"):
        load_resume_checkpoint(tmp_path / "resume.pt")


@pytest.mark.parametrize("convert, found", [
    (lambda weight: (weight * 100).to(torch.int64), "torch.int64"),
    (lambda weight: weight > 0, "torch.bool"),
    (lambda weight: weight.to(torch.complex64), "torch.complex64"),  # loaded, its imaginary part was dropped
    (lambda weight: weight.to_sparse(), "torch.sparse_coo"),  # was a page-long NotImplementedError from isfinite
], ids=["int", "bool", "complex", "sparse"])
def test_weights_that_are_not_dense_real_floating_point_tensors_are_refused(tmp_path, lstm, convert, found):
    # load_state_dict would cast them into the rule without a word: rounded, thresholded or cut weights.
    path = _damaged(tmp_path, lstm, lambda payload: payload["state_dict"].update(weight_hh_l1=convert(payload["state_dict"]["weight_hh_l1"])))
    with pytest.raises(CheckpointError, match=f"corrupt: weights weight_hh_l1 are {found}, not dense real floating-point tensors"):
        load_optimizer(path)
