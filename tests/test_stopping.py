"""Graceful stops: SIGTERM or a first Ctrl-C stop meta-training at an epoch boundary with the checkpoints written there."""

import fcntl
import os
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
import torch

from l2l.checkpoint import load_resume_checkpoint
from l2l.config import TrainConfig
from l2l.meta import StopRequest, TrainingInterrupted, stop_on_signals
from l2l.meta.train import MetaTrainer, meta_train

SMALL = dict(instances=8, optimizee_steps=10, unroll=5, val_every=2, val_problems=8, device="cpu")


def test_a_stop_request_writes_the_checkpoints_at_the_epoch_boundary_and_a_resume_equals_an_uninterrupted_run(tmp_path):
    # checkpoint_every=50: the scheduled checkpoints would lose every epoch; the stop loses none.
    config = TrainConfig(epochs=6, checkpoint_every=50, **SMALL)
    uninterrupted = MetaTrainer(config)
    uninterrupted.run(progress=False)

    stop = StopRequest()
    trainer = MetaTrainer(config, tmp_path)
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.run(progress=False, stop=stop, on_epoch=lambda t: t.epoch == 3 and stop.request("test"))
    assert (stopped.value.epoch, stopped.value.reason) == (3, "test")
    assert stopped.value.resume_checkpoint == tmp_path / "resume.pt"
    assert load_resume_checkpoint(tmp_path / "resume.pt")["epoch"] == 3

    resumed = meta_train(config, tmp_path, resume=tmp_path / "resume.pt", progress=False)
    assert resumed.epochs == 6 and resumed.history == uninterrupted.history
    final = load_resume_checkpoint(tmp_path / "resume.pt")
    for name, value in uninterrupted.rule.state_dict().items():
        assert torch.equal(final["state_dict"][name], value), name


def test_a_stop_asked_for_before_the_first_epoch_writes_nothing_and_one_after_a_save_does_not_write_again(tmp_path, monkeypatch):
    stop = StopRequest()
    stop.request("early")
    with pytest.raises(TrainingInterrupted) as stopped:
        meta_train(TrainConfig(epochs=3, **SMALL), tmp_path / "run", progress=False, stop=stop)
    assert stopped.value.epoch == 0 and stopped.value.resume_checkpoint is None
    assert not (tmp_path / "run").exists()  # the run created it and nothing went in

    saves = []
    monkeypatch.setattr(MetaTrainer, "save", lambda self: saves.append(self.epoch))
    stop = StopRequest()
    trainer = MetaTrainer(TrainConfig(epochs=4, checkpoint_every=2, **SMALL), tmp_path / "other")
    with pytest.raises(TrainingInterrupted):
        trainer.run(progress=False, stop=stop, on_epoch=lambda t: t.epoch == 2 and stop.request())
    assert saves == [2]  # the scheduled save at epoch 2, not a second one for the stop


def test_a_stop_during_the_last_epoch_lets_training_finish():
    stop = StopRequest()
    trainer = MetaTrainer(TrainConfig(epochs=2, **SMALL))
    result = trainer.run(progress=False, stop=stop, on_epoch=lambda t: t.epoch == 2 and stop.request())
    assert result.epochs == 2 and stop.requested


def test_signals_ask_for_a_stop_a_late_second_ctrl_c_stops_at_once_and_the_old_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with stop_on_signals(announce=False, repeat_after_s=0.2) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
        assert (stop.reason, stop.signal_number) == ("SIGTERM", signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # within repeat_after_s of the first: the same request (torchrun forwards it)
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM: the stop is under way already
        time.sleep(0.01)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert stop.reason == "SIGTERM"


def test_a_ctrl_c_after_a_stop_asked_for_otherwise_is_the_first_one_not_an_error():
    """Another process's stop (or a call) comes first under torchrun: this process's own Ctrl-C then joins it.

    The handler read the time of a first signal that had never come (an IndexError, raised into
    whatever the main thread was doing); a later Ctrl-C still stops at once.
    """
    with stop_on_signals(announce=False, repeat_after_s=0.2) as stop:
        stop.request("another process was asked to stop")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
        assert stop.reason == "another process was asked to stop"
        time.sleep(0.3)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)


def test_outside_the_main_thread_the_request_is_made_by_calling_it():
    seen = []

    def worker():
        with stop_on_signals() as stop:
            seen.append(stop.requested)
            stop.request("by hand")
            seen.append(stop.reason)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [False, "by hand"]


def test_sigterm_stops_l2l_train_after_an_epoch_with_the_checkpoints_written_and_it_resumes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "l2l", "train", "--epochs", "100000", "--instances", "8", "--optimizee-steps", "10",
               "--unroll", "5", "--val-problems", "8", "--checkpoint-every", "100000", "--out", str(out), "--no-bench"]
    # Stderr is a terminal, where the bar shows every epoch (into a pipe or a file it is redrawn every 30 s).
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 0 columns would draw an empty bar
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=follower, env={**os.environ, "OMP_NUM_THREADS": "1"})
    os.close(follower)
    progress = bytearray()

    def read_terminal():
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the process has exited
                chunk = b""
            if not chunk:
                return
            progress.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    # Wait for the progress bar to show two finished epochs, so the stop is one the schedule would have lost.
    deadline = time.monotonic() + 120
    while not re.search(rb"\| *([2-9]|\d\d+)/100000", bytes(progress)):
        assert reader.is_alive() and time.monotonic() < deadline, progress.decode(errors="replace")[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)
    reader.join(timeout=10)
    os.close(leader)
    stderr = bytes(progress).decode(errors="replace")
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM: stopping at the end of this epoch" in stderr
    epoch = load_resume_checkpoint(out / "resume.pt")["epoch"]
    assert epoch >= 2
    assert f"SIGTERM: stopped after epoch {epoch} of 100000 with the checkpoints written; " \
           f"continue with: l2l train --resume {out / 'resume.pt'}" in stderr
    assert b"trained" not in stdout  # no summary and no comparison of a run that did not finish

    resumed = subprocess.run([sys.executable, "-m", "l2l", "train", "--resume", str(out / "resume.pt"),
                              "--epochs", str(epoch + 1), "--quiet", "--no-bench"], capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"trained {epoch + 1} epochs" in resumed.stdout
