"""Sharded and distributed meta-training: two processes compute what one process accumulating two shards does."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from l2l.checkpoint import CheckpointError, load_resume_checkpoint
from l2l.config import ConfigError, TrainConfig
from l2l.meta import train as train_module
from l2l.meta.distributed import ShardLayout, local_device
from l2l.meta.train import MetaTrainer, meta_train, shard_streams
from l2l.meta.unroll import start, unroll
from l2l.tasks import QuadraticFamily, QuadraticTask, register_task

from helpers import NoisyQuadraticFamily, TinyMLPFamily

SMALL = dict(instances=8, optimizee_steps=10, unroll=5, val_every=2, val_problems=8, checkpoint_every=1, device="cpu")


def torchrun(arguments, *, processes=2, timeout=180):
    """Runs ``python -m torch.distributed.run --standalone`` with ``processes`` workers; returns the finished process."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """Three epochs of ``l2l train`` on two Gloo processes, one shard each; the output directory."""
    out = tmp_path_factory.mktemp("two-processes")
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]
    finished = torchrun(["-m", "l2l", "train", "--epochs=3", *flags, f"--out={out}", "--no-bench", "--quiet"])
    assert finished.returncode == 0, finished.stderr[-3000:]
    return out, finished


def _equal_states(first, second):
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_two_processes_train_exactly_as_one_process_accumulating_two_shards(two_process_run):
    out, finished = two_process_run
    distributed = load_resume_checkpoint(out / "resume.pt")
    alone = MetaTrainer(TrainConfig(epochs=3, accumulate=2, **SMALL))
    alone.run(progress=False)
    _equal_states(distributed["state_dict"], alone.rule.state_dict())
    assert distributed["progress"]["history"] == alone.history
    shards = distributed["rng"]["shards"]
    assert len(shards) == 2
    for (instances, batches), saved in zip(alone.streams, shards):
        assert instances.get_state().equal(saved["instances"]) and batches.get_state().equal(saved["batches"])
    # Only rank 0 reports.
    assert finished.stdout.count("trained 3 epochs") == 1
    assert finished.stderr.count("2 processes") == 1


def test_a_two_process_checkpoint_resumes_in_one_process_accumulating_two(two_process_run, tmp_path):
    out, _ = two_process_run
    config = TrainConfig(epochs=6, accumulate=2, **SMALL)
    resumed = MetaTrainer(config, tmp_path, warm_start=False)
    resumed.restore(out / "resume.pt")
    resumed.run(progress=False)
    uninterrupted = MetaTrainer(config)
    uninterrupted.run(progress=False)
    _equal_states(resumed.rule.state_dict(), uninterrupted.rule.state_dict())
    # The same meta-losses; the three-epoch run also validated at its last epoch, 3.
    assert [r["meta_loss"] for r in resumed.history] == [r["meta_loss"] for r in uninterrupted.history]


def test_resume_refuses_another_number_of_shards(two_process_run, tmp_path):
    out, _ = two_process_run
    with pytest.raises(CheckpointError, match=r"splits each epoch's instances into 2 shard\(s\).*--accumulate 2"):
        meta_train(TrainConfig(epochs=6, **SMALL), tmp_path, resume=out / "resume.pt", progress=False)
    meta_train(TrainConfig(epochs=1, **SMALL), tmp_path, progress=False)
    # Another layout, not damage: the error says so and nothing else.
    another_layout = r"^resume checkpoint \S+ splits each epoch's instances into 1 shard\(s\).*into 4 \(1 processes x accumulate 4\)"
    with pytest.raises(CheckpointError, match=another_layout):
        meta_train(TrainConfig(epochs=2, accumulate=4, **SMALL), tmp_path / "again", resume=tmp_path / "resume.pt", progress=False)


def test_accumulated_meta_gradient_is_the_meta_gradient_of_all_instances():
    config = TrainConfig(epochs=1, accumulate=2, clip_grad_norm=1e9, **{**SMALL, "optimizee_steps": 5})
    trainer = MetaTrainer(config)
    reference_rule = train_module.build_learned_rule(config)
    captured = []
    original_step = trainer.meta_optimizer.step

    def recording_step(*args, **kwargs):
        captured.append({name: p.grad.clone() for name, p in trainer.rule.named_parameters()})
        return original_step(*args, **kwargs)

    trainer.meta_optimizer.step = recording_step
    trainer.train_epoch()

    family = QuadraticFamily()
    shards = [family.sample(4, shard_streams(config.seed, shard, 2, torch.device("cpu"))[0]) for shard in range(2)]
    union = QuadraticTask(torch.cat([task.W for task in shards]), torch.cat([task.y for task in shards]))
    losses, _ = unroll(reference_rule, union, start(reference_rule, union), 5)
    losses.sum(0).mean().backward()
    assert len(captured) == 1
    for name, parameter in reference_rule.named_parameters():
        torch.testing.assert_close(captured[0][name], parameter.grad, rtol=1e-5, atol=1e-7, msg=name)
        assert parameter.grad.abs().max() > 0, name


class BlowUpFamily(QuadraticFamily):
    """Quadratics whose second half has huge curvature: their loss overflows after the first update."""

    name = "test-blow-up"

    def __init__(self, dim=4):
        super().__init__(dim=dim)
        self.calls = 0

    def sample(self, num_instances, generator, device="cpu"):
        task = super().sample(num_instances, generator, device)
        self.calls += 1
        if self.calls % 2 == 0:  # the second shard of every epoch
            return QuadraticTask(task.W * 1e30, task.y)
        return task


register_task("test-blow-up", BlowUpFamily, replace=True)


def test_a_non_finite_shard_stops_the_meta_step_of_all_shards():
    trainer = MetaTrainer(TrainConfig(task="test-blow-up", epochs=1, accumulate=2, **SMALL))
    trainer.family = BlowUpFamily()  # a fresh count: sampling the validation set was the first call
    before = {name: value.clone() for name, value in trainer.rule.state_dict().items()}
    meta_loss = trainer.train_epoch()
    assert trainer.skipped == 1 and not torch.isfinite(meta_loss)
    _equal_states(trainer.rule.state_dict(), before)


def test_accumulating_shards_of_a_stochastic_task_resumes_exactly(tmp_path):
    config = TrainConfig(task=NoisyQuadraticFamily.name, epochs=4, accumulate=2, **SMALL)
    uninterrupted = MetaTrainer(config)
    uninterrupted.run(progress=False)
    meta_train(dataclasses.replace(config, epochs=2), tmp_path, progress=False)
    resumed = MetaTrainer(config)
    resumed.restore(tmp_path / "resume.pt")
    resumed.run(progress=False)
    _equal_states(resumed.rule.state_dict(), uninterrupted.rule.state_dict())
    assert resumed.history == uninterrupted.history
    # The two shards draw different minibatches.
    assert not resumed.streams[0][1].get_state().equal(resumed.streams[1][1].get_state())


def test_instances_must_split_evenly_into_the_shards():
    with pytest.raises(ConfigError, match=r"8 instances per epoch cannot be split into 3 equal shards .*multiple of 3"):
        MetaTrainer(TrainConfig(epochs=1, accumulate=3, **SMALL))
    with pytest.raises(ConfigError, match="accumulate must be a positive integer"):
        TrainConfig(accumulate=0)
    assert ShardLayout(rank=1, world_size=2, accumulate=3).local == range(3, 6)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_rule_for_a_group_the_task_lacks_gets_no_gradient_and_no_adam_state_whatever_the_shards(accumulate):
    # A conv,fc rule on an MLP: the conv LSTM never acts, so it is not trained, with one shard or several.
    config = TrainConfig(task=TinyMLPFamily.name, split=("conv", "fc"), epochs=1, accumulate=accumulate, hidden_size=4,
                         val_problems=2, device="cpu")
    trainer = MetaTrainer(config)
    conv_before = {name: value.clone() for name, value in trainer.rule.rules["conv"].state_dict().items()}
    trainer.run(progress=False)
    assert trainer.skipped == 0
    for name, parameter in trainer.rule.rules["conv"].named_parameters():
        assert parameter.grad is None, name
        assert parameter not in trainer.meta_optimizer.state, name
        assert torch.equal(parameter, conv_before[name]), name
    for name, parameter in trainer.rule.rules["fc"].named_parameters():
        assert parameter.grad is not None and parameter in trainer.meta_optimizer.state, name


def test_sharded_runs_refuse_cuda_graphs_on(monkeypatch):
    monkeypatch.setattr(train_module, "graph_unsupported_reason", lambda *args: None)
    with pytest.raises(ConfigError, match=r"split into 2 shards \(1 processes x accumulate 2\), which run eagerly"):
        MetaTrainer(TrainConfig(epochs=1, accumulate=2, cuda_graphs="on", **SMALL))


# The scripts below print each line with flush=True: one write per line (under PIPE_BUF, so atomic),
# where the block-buffered stdouts of two processes sharing a pipe could interleave mid-line.
COLLECTIVES_SCRIPT = textwrap.dedent(
    """
    import os
    import torch, torch.distributed as dist
    from l2l.config import ConfigError
    from l2l.meta.distributed import Collectives, current_layout

    import torch._dynamo  # noqa: F401  (before the group starts, as l2l train does: see process_group_from_environment)

    dist.init_process_group("gloo")
    layout = current_layout()
    collectives = Collectives(layout)
    rank = layout.rank
    summed = collectives.sum_(torch.tensor([1.0, rank]))
    source = collectives.broadcast_(torch.tensor([float(rank + 5)]))
    gathered = collectives.gather(torch.tensor([rank, 10 * rank], dtype=torch.uint8))
    print(f"rank {rank}: sum {summed.tolist()} broadcast {source.tolist()} gather {[g.tolist() for g in gathered]} "
          f"any {collectives.any(rank == 1)} none {collectives.any(False)}", flush=True)
    sums = torch.zeros(2, dtype=torch.float64)
    with collectives.together("adding"):
        pass
    with collectives.together("adding", sums):
        sums += torch.tensor([rank + 1.0, 0.5])
    print(f"rank {rank}: together sums {sums.tolist()}", flush=True)
    pieces = collectives.gather_together("reading", lambda: torch.tensor([rank, 7], dtype=torch.uint8), 2)
    print(f"rank {rank}: gathered together {[piece.tolist() for piece in pieces]}", flush=True)
    try:  # rank 1 makes a tensor of another size than promised, which the others' gather would not fit
        collectives.gather_together("reading", lambda: torch.zeros(2 + rank, dtype=torch.uint8), 2)
    except (ValueError, RuntimeError) as error:
        print(f"rank {rank}: gather refused: {type(error).__name__}: {error}", flush=True)
    collectives.check_same("configuration", "same")
    try:
        collectives.check_same("configuration", f"seed {rank}")
    except ConfigError as error:
        print(f"rank {rank}: refused: {error}", flush=True)
    # Both fail, and rank 1 goes without telling the other its error (as a second Ctrl-C there can make it).
    if rank == 1:
        collectives._error_reports = lambda *arguments: os._exit(0)
    try:
        with collectives.together("failing on both"):
            raise ValueError(f"rank {rank}'s own error")
    except Exception as error:
        print(f"rank {rank}: both failed: {type(error).__name__}: {error}", flush=True)
    dist.destroy_process_group()
    """
)


def test_collectives_across_two_processes(tmp_path):
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES_SCRIPT)
    finished = torchrun([str(script)])
    assert finished.returncode == 0, finished.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: sum [2.0, 1.0] broadcast [5.0] gather [[0, 0], [1, 10]] any True none False" in finished.stdout
        assert f"rank {rank}: together sums [3.0, 1.0]" in finished.stdout
        assert f"rank {rank}: gathered together [[0, 7], [1, 7]]" in finished.stdout
    assert "rank 1: gather refused: ValueError: reading made 3 elements of torch.uint8, not 2 of torch.uint8" in finished.stdout
    assert ("rank 0: gather refused: RuntimeError: process 1 failed while reading (ValueError: reading made 3 elements"
            in finished.stdout)
    assert "rank 0: refused: process 0 and process(es) 1 were started with a different configuration" in finished.stdout
    assert "rank 1: refused: process 1 and process(es) 0 were started with a different configuration" in finished.stdout
    assert "rank 0: both failed: ValueError: rank 0's own error" in finished.stdout  # not the backend's error


def test_distributed_training_benchmark_smoke(tmp_path):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "distributed_training.py")
    out = tmp_path / "report.json"
    finished = subprocess.run(
        [sys.executable, script, "--tasks", "quadratic", "--accumulate", "2", "--epochs", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(row["processes"], row["accumulate"]) for row in rows] == [(1, 1), (1, 2), (2, 1)]
    assert rows[0]["speed_vs_one_process"] == 1.0
    for row in rows:
        assert row["instances"] == 128 and row["seconds_per_epoch"] > 0 and row["peak_rss_growth_bytes_per_process"] > 0
        ratio = rows[0]["seconds_per_epoch"] / row["seconds_per_epoch"]
        assert row["speed_vs_one_process"] == pytest.approx(ratio)


def test_every_process_stops_on_an_output_directory_that_holds_another_run(two_process_run):
    out, _ = two_process_run  # holds the fixture's run: a fresh run there must be refused, by both ranks
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL.items()]
    finished = torchrun(["-m", "l2l", "train", "--epochs=1", *flags, f"--out={out}", "--no-bench", "--quiet"])
    assert finished.returncode != 0
    # Rank 0's message, and rank 1 repeats it instead of dying in a collective.
    assert finished.stderr.count("already holds a training run") == 2
    assert f"process 0 failed while checking the output directory (ConfigError: {out} already holds a training run" in finished.stderr
    assert "Connection reset" not in finished.stderr


MISMATCH_SCRIPT = textwrap.dedent(
    """
    import datetime, sys
    import torch.distributed as dist
    from l2l.config import TrainConfig
    from l2l.meta.train import meta_train

    import torch._dynamo  # noqa: F401  (before the group starts, as l2l train does: see process_group_from_environment)

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a regression waits a minute, not 30
    rank = dist.get_rank()
    out, other, fixture_resume, early_resume = sys.argv[1:5]
    small = dict({small})
    def attempt(scenario, **arguments):
        try:
            meta_train(TrainConfig(**small), progress=False, **arguments)
            print(f"rank {{rank}} {{scenario}}: trained", flush=True)
        except Exception as error:
            print(f"rank {{rank}} {{scenario}}: {{type(error).__name__}}: {{error}}", flush=True)
    attempt("out-on-rank-0-only", out_dir=out if rank == 0 else None)
    attempt("resume-missing-on-rank-1", resume=fixture_resume if rank == 0 else other + "/missing/resume.pt")
    attempt("resume-from-different-epochs", resume=fixture_resume if rank == 0 else early_resume)
    attempt("resume-from-one-checkpoint", resume=fixture_resume)
    dist.destroy_process_group()
    """
)


def test_processes_given_different_arguments_or_failing_alone_all_stop_with_a_message(two_process_run, tmp_path):
    fixture_out, _ = two_process_run
    early = tmp_path / "early"
    meta_train(TrainConfig(epochs=1, accumulate=2, **SMALL), early, progress=False)  # 2 shards, like the fixture's
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH_SCRIPT.format(small=repr(dict(SMALL, epochs=4))))
    finished = torchrun([str(script), str(tmp_path / "out"), str(tmp_path), str(fixture_out / "resume.pt"),
                         str(early / "resume.pt")], timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    lines = finished.stdout
    for rank, other in ((0, 1), (1, 0)):
        assert (f"rank {rank} out-on-rank-0-only: ConfigError: process {rank} and process(es) {other} were started with a "
                "different choice of writing an output directory and of resuming") in lines
        assert (f"rank {rank} resume-from-different-epochs: ConfigError: process {rank} and process(es) {other} were started "
                "with a different training state (epoch, weights, meta-optimizer, history)") in lines
    assert "rank 1 resume-missing-on-rank-1: CheckpointError: checkpoint" in lines
    assert ("rank 0 resume-missing-on-rank-1: RuntimeError: process 1 failed while loading the resume checkpoint "
            f"(CheckpointError: checkpoint {tmp_path}/missing/resume.pt") in lines
    assert "; this process stops too" in lines.split("rank 0 resume-missing-on-rank-1")[1].splitlines()[0]
    assert lines.count(": trained") == 2 and "rank 0 resume-from-one-checkpoint: trained" in lines


GROUP_THREADS_SCRIPT = textwrap.dedent(
    """
    import os
    import torch
    from l2l.meta.distributed import process_group_from_environment

    def threads():
        return sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))

    with process_group_from_environment(torch.device("cpu")) as started:
        assert started
        weight = torch.nn.Parameter(torch.ones(3))
        weight.grad = torch.ones(3)
        torch.optim.Adam([weight]).step()  # imports torch._dynamo, as every meta-training run's first step does
    os.write(1, f"left after the group: {[name for name in threads() if 'gloo' in name]}\\n".encode())  # one write: ranks interleave
    """
)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the threads from /proc (Linux)")
def test_the_process_group_is_gone_with_its_threads_when_the_block_ends(tmp_path):
    # torch._dynamo imported after the group started kept it alive past destroy_process_group: Gloo's
    # threads outlived it and, freeing a collective's tensors as the interpreter exited, aborted one
    # process in some 5% of successful runs ("terminate called without an active exception", exit -6).
    script = tmp_path / "threads.py"
    script.write_text(GROUP_THREADS_SCRIPT)
    finished = torchrun([str(script)])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("left after the group: []") == 2, finished.stdout


def test_an_explicit_gpu_under_torchrun_with_several_processes_per_node_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert local_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device cuda:0 would put all 2 processes of this node on one GPU; pass --device cuda"):
        local_device(torch.device("cuda", 0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per node: its GPU is the user's choice
    assert local_device(torch.device("cuda", 3)) == torch.device("cuda", 3)


STOP_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch.distributed as dist
    from l2l.config import TrainConfig
    from l2l.meta import StopRequest, TrainingInterrupted
    from l2l.meta.train import MetaTrainer

    import torch._dynamo  # noqa: F401  (before the group starts, as l2l train does: see process_group_from_environment)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stop = StopRequest()
    trainer = MetaTrainer(TrainConfig(**{small}), sys.argv[1])
    try:  # only rank 1 is asked to stop, after epoch 3
        trainer.run(progress=False, stop=stop, on_epoch=lambda t: rank == 1 and t.epoch == 3 and stop.request("rank 1's"))
    except TrainingInterrupted as stopped:
        print(f"rank {{rank}} stopped after epoch {{stopped.epoch}}: {{stopped.reason}}", flush=True)
    dist.destroy_process_group()
    """
)


def test_a_stop_asked_of_one_process_stops_every_process_at_the_same_epoch_with_the_checkpoints_written(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(STOP_SCRIPT.format(small=repr(dict(SMALL, epochs=6, checkpoint_every=50))))
    finished = torchrun([str(script), str(tmp_path / "out")])
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "rank 1 stopped after epoch 3: rank 1's" in finished.stdout
    assert "rank 0 stopped after epoch 3: another process was asked to stop" in finished.stdout
    assert load_resume_checkpoint(tmp_path / "out" / "resume.pt")["epoch"] == 3


FAILURE_SCRIPT = textwrap.dedent(
    """
    import datetime, os, signal, sys, time
    import torch.distributed as dist
    from l2l.config import TrainConfig
    from l2l.meta.train import MetaTrainer, meta_train
    from l2l.tasks import QuadraticFamily, QuadraticTask, register_task

    sys.path.insert(0, sys.argv[1])
    from helpers import TinyMLPFamily

    # A regression (a process left waiting in a collective) fails after 20 s, not the default 30 minutes.
    import torch._dynamo  # noqa: F401  (before the group starts, as l2l train does: see process_group_from_environment)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()
    report = open(f"{{sys.argv[2]}}/rank-{{rank}}.txt", "w")  # not stdout, where the two processes' lines can mix
    FAIL = {{"at": None, "calls": 0, "interrupt": False}}

    class FailingFamily(QuadraticFamily):
        # Quadratics whose loss raises on rank 1 at its FAIL["at"]-th call (the first is the initial loss), or
        # there sends rank 1 a SIGINT (a Ctrl-C that reached it alone): Python raises KeyboardInterrupt mid-unroll.
        name = "test-failing-loss"

        def sample(self, num_instances, generator, device="cpu"):
            base = super().sample(num_instances, generator, device)

            class Task(QuadraticTask):
                def loss(self, params, batch=None):  # overridden: autograd differentiates it, call by call
                    FAIL["calls"] += 1
                    if rank == 1 and FAIL["calls"] == FAIL["at"] and FAIL["interrupt"]:
                        os.kill(os.getpid(), signal.SIGINT)
                    elif rank == 1 and FAIL["calls"] == FAIL["at"]:
                        raise ValueError(f"loss raised at call {{FAIL['calls']}}")
                    return super().loss(params, batch)

            return Task(base.W, base.y)

    register_task("test-failing-loss", FailingFamily, replace=True)
    small = dict({small})

    def attempt(scenario, fail_at, interrupt=False):
        FAIL.update(at=fail_at, calls=0, interrupt=interrupt)
        begin = time.perf_counter()
        try:
            meta_train(TrainConfig(task="test-failing-loss", **small), progress=False)
            outcome = "trained"
        except (Exception, KeyboardInterrupt) as error:  # a Python session interrupted by hand goes on
            outcome = f"{{type(error).__name__}}: {{error}}"
        print(f"rank {{rank}} {{scenario}} after {{time.perf_counter() - begin:.1f}} s: {{outcome}}", file=report, flush=True)

    attempt("fails-at-step-3", 4)  # call 1 is the initial loss: step 3 of the first truncation
    attempt("fails-at-the-start", 1)
    attempt("interrupted-at-step-3", 4, interrupt=True)
    attempt("fails-nowhere", None)  # the processes are still in step with each other
    trainer = MetaTrainer(TrainConfig(task=TinyMLPFamily.name, split=("conv", "fc"), epochs=1, hidden_size=4,
                                      val_problems=2, device="cpu"))
    trainer.run(progress=False)
    conv = list(trainer.rule.rules["conv"].parameters())
    print(f"rank {{rank}} conv rule: gradients {{[p.grad for p in conv if p.grad is not None]}}, "
          f"Adam states {{sum(p in trainer.meta_optimizer.state for p in conv)}}", file=report, flush=True)
    dist.destroy_process_group()
    """
)


def test_a_process_failing_mid_epoch_stops_every_process_promptly_naming_its_error(tmp_path):
    script = tmp_path / "failure.py"
    script.write_text(FAILURE_SCRIPT.format(small=repr(dict(SMALL, epochs=2))))
    finished = torchrun([str(script), os.path.dirname(__file__), str(tmp_path)], timeout=150)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    reported = (tmp_path / "rank-0.txt").read_text() + (tmp_path / "rank-1.txt").read_text()
    lines = {line.split(" after ")[0]: line for line in reported.splitlines() if " after " in line}
    seconds = {name: float(line.split(" after ")[1].split(" s:")[0]) for name, line in lines.items()}
    expected = {
        "fails-at-step-3": ("ValueError: loss raised at call 4",
                            "RuntimeError: process 1 failed while unrolling and backpropagating its shards of epoch 1 "
                            "(optimizee steps 0-5) (ValueError: loss raised at call 4); this process stops too"),
        "fails-at-the-start": ("ValueError: loss raised at call 1",
                               "RuntimeError: process 1 failed while sampling epoch 1's instances and their initial losses "
                               "and setting its meta-learning rate (ValueError: loss raised at call 1); this process stops too"),
        "interrupted-at-step-3": ("KeyboardInterrupt: ",
                                  "RuntimeError: process 1 failed while unrolling and backpropagating its shards of epoch 1 "
                                  "(optimizee steps 0-5) (KeyboardInterrupt); this process stops too"),
        "fails-nowhere": ("trained", "trained"),
    }
    for scenario, (failing, other) in expected.items():
        assert lines[f"rank 1 {scenario}"].endswith(f": {failing}"), lines
        assert lines[f"rank 0 {scenario}"].endswith(f": {other}"), lines
        assert seconds[f"rank 0 {scenario}"] < 10, lines  # not the 20 s collective timeout
    for rank in (0, 1):  # with two shards, across processes: the conv LSTM of a conv,fc rule on an MLP is not trained
        assert f"rank {rank} conv rule: gradients [], Adam states 0" in reported


LATE_FAILURE_SCRIPT = textwrap.dedent(
    """
    import datetime, os, signal, sys, time
    import torch
    import torch.distributed as dist
    from l2l.config import TrainConfig
    from l2l.meta import train
    from l2l.meta.train import MetaTrainer

    # A regression (a process left waiting in a collective) fails after 20 s, not the default 30 minutes.
    import torch._dynamo  # noqa: F401  (before the group starts, as l2l train does: see process_group_from_environment)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
    rank = dist.get_rank()
    report = open(f"{{sys.argv[1]}}/rank-{{rank}}.txt", "w")  # not stdout, where the two processes' lines can mix
    small = dict({small})
    clip, flatten = torch.nn.utils.clip_grad_norm_, train.flatten_grads

    def failing_on_rank_1(function, at, error):
        # function, except that its at-th call raises error on rank 1.
        calls = [0]
        def call(*args, **kwargs):
            calls[0] += 1
            if rank == 1 and calls[0] == at:
                raise error
            return function(*args, **kwargs)
        return call

    class FailingHistory(list):
        # A history whose append raises on rank 1: recording an epoch that was not validated fails.
        def append(self, record):
            if rank == 1:
                raise MemoryError("appending to the history")
            super().append(record)

    class UnreadableState:
        # Stands in for a generator whose state cannot be read (out of memory stacking the states).
        def get_state(self):
            raise torch.OutOfMemoryError("out of memory reading a generator's state")

    def unreadable_generator_states_on_rank_1(trainer):
        save = trainer.save
        def failing_save():
            streams = trainer.streams
            if rank == 1:
                trainer.streams = [(UnreadableState(), batches) for _, batches in streams]
            try:
                save()
            finally:
                trainer.streams = streams
        trainer.save = failing_save

    def attempt(scenario, step_fails_at=None, clip_fails_at=None, flatten_fails_at=None, on_epoch=None, prepare=None,
                out=False, resume=None, **options):
        trainer = MetaTrainer(TrainConfig(**dict(small, **options)), f"{{sys.argv[1]}}/{{scenario}}" if out else None)
        if prepare is not None:
            prepare(trainer)
        trainer.meta_optimizer.step = failing_on_rank_1(trainer.meta_optimizer.step, step_fails_at,
                                                        torch.OutOfMemoryError("out of memory in Adam's step"))
        torch.nn.utils.clip_grad_norm_ = failing_on_rank_1(clip, clip_fails_at, RuntimeError("clipping failed"))
        train.flatten_grads = failing_on_rank_1(flatten, flatten_fails_at, torch.OutOfMemoryError("out of memory in flatten"))
        begin = time.perf_counter()
        try:
            if resume is not None:
                trainer.restore(resume)
            trainer.run(progress=False, on_epoch=on_epoch)
            outcome = "trained"
        except (Exception, KeyboardInterrupt) as error:
            outcome = f"{{type(error).__name__}}: {{error}}"
        finally:
            torch.nn.utils.clip_grad_norm_, train.flatten_grads = clip, flatten
        print(f"rank {{rank}} {{scenario}} after {{time.perf_counter() - begin:.1f}} s: {{outcome}}", file=report, flush=True)

    # Two truncations (meta-steps) an epoch: the others go on to the epoch's next truncation, or end the epoch.
    attempt("step-fails-mid-epoch", step_fails_at=1)
    attempt("step-fails-at-the-end-of-an-epoch", step_fails_at=2)
    attempt("step-fails-at-the-end-of-the-last-epoch", step_fails_at=4)
    attempt("clipping-fails-mid-epoch", clip_fails_at=1)
    attempt("clipping-fails-at-the-end-of-an-epoch", clip_fails_at=2)
    # The first step's huge rate makes the second truncation non-finite: the others stop with a NonFiniteError.
    attempt("clipping-fails-as-the-others-give-up-on-non-finite-steps", clip_fails_at=2, max_nonfinite=1, meta_lr=1e30)
    # Before the all-reduce, gathering the meta-gradients into its vector: the others are in it.
    attempt("gathering-the-meta-gradients-fails", flatten_fails_at=1)
    attempt("on-epoch-fails", on_epoch=lambda trainer: rank == 1 and 1 / 0)
    attempt("on-epoch-fails-after-the-last-epoch", on_epoch=lambda trainer: rank == 1 and trainer.epoch == 2 and 1 / 0)
    attempt("on-epoch-interrupted", on_epoch=lambda trainer: rank == 1 and os.kill(os.getpid(), signal.SIGINT))
    # Process-local work between the collectives of an epoch: its meta-learning rate, and after each truncation's
    # all-reduce counting the meta-step and keeping its meta-loss (the others go on to the next truncation's
    # all-reduce, or to the epoch's closing one), and averaging the meta-losses (the others are in the closing one).
    attempt("setting-the-meta-learning-rate-fails", prepare=lambda trainer: setattr(
        trainer, "_set_learning_rate", failing_on_rank_1(trainer._set_learning_rate, 1, MemoryError("learning rate"))))
    for at, where in ((1, "mid-epoch"), (2, "at-the-end-of-an-epoch")):
        attempt(f"recording-a-meta-step-fails-{{where}}", prepare=lambda trainer: setattr(
            trainer, "_record_truncation", failing_on_rank_1(trainer._record_truncation, at, MemoryError("recording"))))
    attempt("averaging-the-meta-losses-fails", prepare=lambda trainer: setattr(
        trainer, "_mean_meta_loss", failing_on_rank_1(trainer._mean_meta_loss, 1, MemoryError("averaging"))))
    # Between the collectives of an epoch: recording it (a validated one's copy of the best weights, or the history).
    attempt("recording-a-validation-fails", val_every=1,
            prepare=lambda trainer: setattr(trainer, "_consider", failing_on_rank_1(trainer._consider, 1, MemoryError("copying"))))
    attempt("recording-an-epoch-fails", prepare=lambda trainer: setattr(trainer, "history", FailingHistory()))
    attempt("collecting-the-generator-states-fails", out=True, prepare=unreadable_generator_states_on_rank_1)
    attempt("fails-nowhere", out=True)  # the processes are still in step with each other
    resume = f"{{sys.argv[1]}}/fails-nowhere/resume.pt"
    attempt("digesting-the-resumed-state-fails", resume=resume,
            prepare=lambda trainer: setattr(trainer, "_state_digest", failing_on_rank_1(trainer._state_digest, 1, MemoryError("digest"))))
    attempt("resumes-failing-nowhere", resume=resume)
    dist.destroy_process_group()
    """
)


def test_a_process_failing_after_the_all_reduce_in_on_epoch_or_between_collectives_stops_every_process_promptly(tmp_path):
    script = tmp_path / "late_failure.py"
    script.write_text(LATE_FAILURE_SCRIPT.format(small=repr(dict(SMALL, epochs=2))))
    finished = torchrun([str(script), str(tmp_path)], timeout=150)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-3000:]
    reported = (tmp_path / "rank-0.txt").read_text() + (tmp_path / "rank-1.txt").read_text()
    lines = {line.split(" after ")[0]: line for line in reported.splitlines()}
    seconds = {name: float(line.split(" after ")[1].split(" s:")[0]) for name, line in lines.items()}
    step = "OutOfMemoryError: out of memory in Adam's step"
    clip = "RuntimeError: clipping failed"
    callback = "ZeroDivisionError: division by zero"

    def others(what, error):
        return f"RuntimeError: process 1 failed while {what} ({error}); this process stops too"

    def meta_step(epoch, first):
        return f"clipping the meta-gradient and taking the meta-optimizer step of epoch {epoch} (optimizee steps {first}-{first + 5})"

    expected = {
        "step-fails-mid-epoch": (step, others(meta_step(1, 0), step)),
        "step-fails-at-the-end-of-an-epoch": (step, others(meta_step(1, 5), step)),
        "step-fails-at-the-end-of-the-last-epoch": (step, others(meta_step(2, 5), step)),
        "clipping-fails-mid-epoch": (clip, others(meta_step(1, 0), clip)),
        "clipping-fails-at-the-end-of-an-epoch": (clip, others(meta_step(1, 5), clip)),
        "clipping-fails-as-the-others-give-up-on-non-finite-steps": (clip, others(meta_step(1, 5), clip)),
        "gathering-the-meta-gradients-fails": (
            "OutOfMemoryError: out of memory in flatten",
            others("unrolling and backpropagating its shards of epoch 1 (optimizee steps 0-5)", "OutOfMemoryError: out of memory in flatten"),
        ),
        "on-epoch-fails": (callback, others("running the on_epoch callback after epoch 1", callback)),
        "on-epoch-fails-after-the-last-epoch": (callback, others("running the on_epoch callback after epoch 2", callback)),
        "on-epoch-interrupted": ("KeyboardInterrupt: ", others("running the on_epoch callback after epoch 1", "KeyboardInterrupt")),
        "setting-the-meta-learning-rate-fails": (
            "MemoryError: learning rate",
            others("sampling epoch 1's instances and their initial losses and setting its meta-learning rate",
                   "MemoryError: learning rate"),
        ),
        "recording-a-meta-step-fails-mid-epoch": (
            "MemoryError: recording", others("recording the meta-step of epoch 1 (optimizee steps 0-5)", "MemoryError: recording")),
        "recording-a-meta-step-fails-at-the-end-of-an-epoch": (
            "MemoryError: recording", others("recording the meta-step of epoch 1 (optimizee steps 5-10)", "MemoryError: recording")),
        "averaging-the-meta-losses-fails": ("MemoryError: averaging", others("averaging the meta-losses of epoch 1", "MemoryError: averaging")),
        "recording-a-validation-fails": ("MemoryError: copying", others("recording epoch 1", "MemoryError: copying")),
        "recording-an-epoch-fails": ("MemoryError: appending to the history",
                                     others("recording epoch 1", "MemoryError: appending to the history")),
        "collecting-the-generator-states-fails": (
            "OutOfMemoryError: out of memory reading a generator's state",
            others("collecting the generator states for the checkpoint of epoch 1",
                   "OutOfMemoryError: out of memory reading a generator's state"),
        ),
        "fails-nowhere": ("trained", "trained"),
        "digesting-the-resumed-state-fails": ("MemoryError: digest", others("loading the resume checkpoint", "MemoryError: digest")),
        "resumes-failing-nowhere": ("trained", "trained"),
    }
    for scenario, (failing, other) in expected.items():
        assert lines[f"rank 1 {scenario}"].endswith(f": {failing}"), lines
        assert lines[f"rank 0 {scenario}"].endswith(f": {other}"), lines
        assert max(seconds[f"rank {rank} {scenario}"] for rank in (0, 1)) < 10, lines  # not the 20 s collective timeout
    assert load_resume_checkpoint(tmp_path / "fails-nowhere" / "resume.pt")["epoch"] == 2
