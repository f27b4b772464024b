"""Reliability (docs/reliability.md): non-finite steps, preemption, damaged checkpoints, full disks
and reused dump folders, on the debug model. scripts/fault_drill.py runs the same faults end to end
(kill -9, SIGTERM to torchrun, a real full tmpfs) and prints a table."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from titan_mm.config import ConfigError, parse_args
from titan_mm.train.checkpoint import DRILL_ENOSPC_STEP, CheckpointError
from titan_mm.train.manifest import read_manifest, saved_steps
from titan_mm.train.nonfinite import DRILL_NAN_STEPS, NonFiniteError
from titan_mm.train.resume import TrainingComplete, check_same_job

DEBUG = "train_configs/debug_vlm.toml"
SMALL = ["--training.seq_len", "128", "--data.image_slots_per_row", "4", "--metrics.log_freq", "1",
         "--metrics.enable_tensorboard", "false", "--checkpoint.export_model_only", "false"]


def args(dump, *overrides: str) -> list[str]:
    return ["--job.config_file", DEBUG, "--job.dump_folder", str(dump), *SMALL, *overrides]


def config(dump, *overrides: str):
    return parse_args(args(dump, *overrides))[0]


def train(dump, *overrides: str):
    import train as train_py
    trainer = train_py.Trainer(config(dump, *overrides))
    trainer.train()
    return trainer


def main(dump, *overrides: str) -> int:
    import train as train_py
    return train_py.main(args(dump, *overrides))


def losses_json(dump) -> dict[int, float]:
    with open(os.path.join(dump, "losses.json")) as f:
        return {int(k): v for k, v in json.load(f).items()}


def train_log(dump) -> str:
    with open(os.path.join(dump, "train.log")) as f:
        return f.read()


def checkpoints(dump) -> list[int]:
    return saved_steps(os.path.join(dump, "checkpoint"))


def checkpoint_weights(dump, step: int) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    folder = os.path.join(dump, "checkpoint", f"step-{step}")
    return _load_state_dict_from_keys({"model"}, checkpoint_id=folder)["model"]


def optimizer_snapshot(trainer) -> list[torch.Tensor]:
    params = [p for part in trainer.model_parts for p in part.parameters()]
    state = trainer.optimizers[0].state
    return [t.detach().clone() for p in params for t in (p, *state[p].values())]


# --- non-finite steps ------------------------------------------------------------------------------

@pytest.mark.parametrize("lr", ["inf", "-inf", "nan"])
def test_non_finite_learning_rates_are_config_errors(tmp_path, lr):
    """--optimizer.lr inf used to pass validation and train on NaN."""
    with pytest.raises(ConfigError, match=r"optimizer.lr = -?(inf|nan) must be a finite number"):
        config(tmp_path, "--optimizer.lr", lr)


def test_skip_policy_needs_the_fused_optimizer(tmp_path):
    with pytest.raises(ConfigError, match=r"training.nonfinite = \"skip\" drops a step inside the fused AdamW"):
        config(tmp_path, "--optimizer.implementation", "foreach")


def test_a_skipped_step_leaves_parameters_and_optimizer_state_bit_identical(tmp_path, monkeypatch):
    """NaN gradients at step 3 (the drill hook): after it, every parameter, AdamW moment and step
    count equals its value after step 2, bit for bit; step 4 trains again and the skip is counted."""
    import train as train_py
    monkeypatch.setenv(DRILL_NAN_STEPS, "3")
    trainer = train_py.Trainer(config(tmp_path, "--checkpoint.enable", "false", "--training.steps", "4"))

    def step():
        trainer.train_state.step += 1
        trainer.train_step()

    step(), step()
    before = optimizer_snapshot(trainer)
    step()
    after = optimizer_snapshot(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert trainer.nonfinite.poll() == 1
    step()
    assert not all(torch.equal(a, b) for a, b in zip(after, optimizer_snapshot(trainer)))
    assert trainer.nonfinite.poll() == 1


def test_non_finite_steps_in_a_row_stop_the_run_naming_them(tmp_path, monkeypatch, capsys):
    """NaN from step 3 on with nonfinite_max_consecutive = 3: the run exits 3 at step 5 naming steps
    3-5. The step-4 checkpoint holds the model of step 2 (both updates were dropped), finite."""
    monkeypatch.setenv(DRILL_NAN_STEPS, "3-")
    code = main(tmp_path, "--training.steps", "10", "--training.nonfinite_max_consecutive", "3",
                "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "1")
    assert code == 3
    assert "steps 3-5 all had a non-finite loss or gradient norm" in capsys.readouterr().err
    assert checkpoints(tmp_path) == [4]
    assert all(torch.isfinite(w).all() for w in checkpoint_weights(tmp_path, 4).values())
    assert sorted(losses_json(tmp_path)) == [1, 2, 3, 4, 5]


def test_stop_policy_ends_the_run_at_the_first_non_finite_step(tmp_path, monkeypatch):
    monkeypatch.setenv(DRILL_NAN_STEPS, "3")
    with pytest.raises(NonFiniteError, match=r"step 3 had a non-finite loss or gradient norm"):
        train(tmp_path, "--training.steps", "6", "--training.nonfinite", "stop")
    assert checkpoints(tmp_path) == []  # the only save (step 6) was never reached


def test_a_huge_learning_rate_stops_instead_of_checkpointing_nan_weights(tmp_path, capsys):
    """The issue's --optimizer.lr 1e6 trained on NaN weights to the end, exited 0, and keep_latest_k
    deleted the good checkpoints. Now the run stops with exit code 3 and every kept checkpoint is
    finite."""
    code = main(tmp_path, "--training.steps", "30", "--optimizer.lr", "1e6", "--checkpoint.interval", "2",
                "--checkpoint.keep_latest_k", "2")
    assert code == 3, capsys.readouterr().err
    for step in checkpoints(tmp_path):
        assert all(torch.isfinite(w).all() for w in checkpoint_weights(tmp_path, step).values()), step


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    """Finite losses and gradient norms, but a parameter overflowed: the save is refused."""
    import train as train_py
    trainer = train_py.Trainer(config(tmp_path, "--training.steps", "4"))
    next(trainer.model.parameters()).data.view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteError, match="the parameters hold NaN or inf"):
        trainer.check_finite(1)


# --- preemption ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,async_save", [(signal.SIGTERM, "true"), (signal.SIGUSR1, "false")],
                         ids=["sigterm-async", "sigusr1-sync"])
def test_a_preemption_signal_saves_at_the_end_of_the_step_and_resume_is_bitwise_exact(
        tmp_path, monkeypatch, sig, async_save):
    """The signal arrives during step 3: the run saves step-3 and returns (exit 0); the resumed run's
    steps 4-6 equal an uninterrupted run's bit for bit, and losses.json holds steps 1-6."""
    import train as train_py
    common = ["--training.steps", "6", "--checkpoint.interval", "100", "--checkpoint.async_save", async_save]
    straight = train(tmp_path / "straight", *common)
    straight_losses = [loss.item() for loss in straight.losses]

    interrupted = train_py.Trainer(config(tmp_path / "run", *common))
    original = interrupted.train_step

    def signalled_at_step_3():
        if interrupted.train_state.step == 3:
            os.kill(os.getpid(), sig)
        original()

    monkeypatch.setattr(interrupted, "train_step", signalled_at_step_3)
    handler = signal.getsignal(sig)
    interrupted.train()
    assert interrupted.train_state.step == 3 and checkpoints(tmp_path / "run") == [3]
    assert signal.getsignal(sig) == handler  # restored
    resumed = train(tmp_path / "run", *common)
    assert resumed.resume_step == 3
    history = losses_json(tmp_path / "run")
    assert sorted(history) == [1, 2, 3, 4, 5, 6]
    assert [history[s] for s in range(1, 7)] == straight_losses


def test_sigterm_to_torchrun_saves_a_checkpoint_on_every_rank(tmp_path):
    """Two gloo processes under torchrun; SIGTERM to torchrun once step 3 is logged: torchrun
    forwards it, both ranks save the same step (one file each in its manifest) and exit 0; a
    resumed 2-process run ends with the losses of an uninterrupted one (1e-6 relative: gloo's
    reductions are the only difference)."""
    from test_parallel import torchrun
    common = ["--training.seq_len", "128", "--data.image_slots_per_row", "4", "--training.steps", "8",
              "--checkpoint.enable", "true", "--checkpoint.interval", "100",
              "--parallelism.data_parallel_shard_degree", "2"]
    straight = torchrun(2, tmp_path / "straight", *common)
    dump = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           "--job.config_file", DEBUG, "--job.dump_folder", str(dump), "--metrics.enable_tensorboard", "false",
           "--metrics.log_freq", "1", *common]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    log = []
    for line in proc.stdout:
        log.append(line)
        if "step     3/8" in line:
            proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    text = "".join(log)
    match = re.search(r"preempted \(SIGTERM\) at step (\d+): saved checkpoint step-\1", text)
    assert match, text[-3000:]
    step = int(match.group(1))
    assert 3 <= step < 8 and checkpoints(dump) == [step]
    files = read_manifest(os.path.join(dump, "checkpoint", f"step-{step}"))["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)
    resumed = torchrun(2, dump, *common)
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == pytest.approx(straight, rel=1e-6)


def test_every_save_copies_into_the_host_buffers_of_the_first(tmp_path):
    """An async save on a GPU copies the state into the pinned host buffers of the first save
    (FileSystemWriter(cache_staged_state_dict=True)), which needs the same structure every time,
    though the data position (open rows, buffered records) changes from step to step. Checked with
    DCP's staging helpers on CPU (pinned memory needs a GPU)."""
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
    from torch.distributed.checkpoint.state_dict_saver import _stateful_to_state_dict
    trainer = config_and_build(tmp_path, "--checkpoint.enable", "false", "--training.steps", "4")
    cache = None
    for step in range(1, 4):
        trainer.train_state.step = step
        trainer.train_step()
        staged = _stateful_to_state_dict(trainer.checkpointer.states)
        if cache is None:
            cache = _create_cpu_state_dict(staged)
        _copy_state_dict(staged, cache)  # raises CompanionMismatch if the structure changed


# --- damaged checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A dump folder with step-2 and step-4, and the losses of its 4 steps."""
    dump = tmp_path_factory.mktemp("two_checkpoints") / "run"
    trainer = train(dump, "--training.steps", "4", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0")
    return dump, [loss.item() for loss in trainer.losses]


def damage(folder: str, how: str) -> str:
    """Damage one file of a checkpoint folder; returns the file's name."""
    name = ".metadata" if how == "truncate-metadata" else "__0_0.distcp"
    path = os.path.join(folder, name)
    if how.startswith("truncate"):
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "delete":
        os.remove(path)
    else:  # flip bytes in the middle of the weights
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            chunk = f.read(16)
            f.seek(os.path.getsize(path) // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))
    return name


@pytest.mark.parametrize("how,problem", [
    ("truncate-distcp", "has \\d+ bytes, the manifest says \\d+"),
    ("truncate-metadata", "has \\d+ bytes, the manifest says \\d+"),
    ("delete", "is missing"),
    ("flip", "has crc32 [0-9a-f]{8}, the manifest says [0-9a-f]{8}"),
])
def test_a_damaged_newest_checkpoint_is_reported_and_the_run_falls_back(tmp_path, two_checkpoints, how, problem):
    """The damage used to give a 50-line traceback (truncation) or load silently (flipped bytes).
    Now the warning names the step, the file and the problem, step-4 is renamed step-4.damaged, and
    the run continues from step-2: its steps 3-4 equal the original run's bit for bit."""
    source, original_losses = two_checkpoints
    dump = tmp_path / "run"
    shutil.copytree(source, dump)
    name = damage(os.path.join(dump, "checkpoint", "step-4"), how)
    resumed = train(dump, "--training.steps", "4", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0")
    assert re.search(rf"WARNING checkpoint step-4 \(.*\) is damaged: {re.escape(name)} {problem}.*falling back",
                     train_log(dump))
    assert resumed.resume_step == 2
    assert os.path.isdir(os.path.join(dump, "checkpoint", "step-4.damaged"))
    assert [loss.item() for loss in resumed.losses] == original_losses[2:]
    assert checkpoints(dump) == [2, 4]  # step-4 saved again, whole


def test_a_damaged_load_step_is_an_error_naming_the_file(tmp_path, two_checkpoints):
    dump = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], dump)
    damage(os.path.join(dump, "checkpoint", "step-2"), "flip")
    with pytest.raises(CheckpointError, match=r"checkpoint step-2 .* is damaged: __0_0.distcp has crc32 .* "
                                              r"Set checkpoint.load_step to another saved step"):
        config_and_build(dump, "--training.steps", "6", "--checkpoint.load_step", "2")


def test_every_checkpoint_damaged_is_an_error(tmp_path, two_checkpoints):
    dump = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], dump)
    for step in (2, 4):
        damage(os.path.join(dump, "checkpoint", f"step-{step}"), "delete")
    with pytest.raises(CheckpointError, match=r"every checkpoint in .* is damaged \(steps \[4, 2\]"):
        config_and_build(dump, "--training.steps", "6")


def test_a_save_interrupted_by_a_crash_is_ignored_and_removed(tmp_path, two_checkpoints):
    """kill -9 during a save leaves step-N.partial: never a candidate, removed at the next start."""
    dump = tmp_path / "run"
    shutil.copytree(two_checkpoints[0], dump)
    partial = os.path.join(dump, "checkpoint", "step-6.partial")
    shutil.copytree(os.path.join(dump, "checkpoint", "step-4"), partial)
    os.remove(os.path.join(partial, "manifest.json"))
    trainer = config_and_build(dump, "--training.steps", "6")
    assert trainer.resume_step == 4 and not os.path.exists(partial)


def config_and_build(dump, *overrides: str):
    import train as train_py
    return train_py.Trainer(config(dump, *overrides))


# --- full disk -------------------------------------------------------------------------------------

@pytest.mark.parametrize("async_save", ["true", "false"])
def test_a_full_disk_says_so_and_keeps_the_newest_good_checkpoint(tmp_path, monkeypatch, capsys, async_save):
    """The save of step 4 fails with ENOSPC (the drill hook; scripts/fault_drill.py fills a real
    tmpfs): one message that says the disk is full, exit code 4, step-2 intact and verified, the
    partial step-4 removed. It used to be torch.save's "unexpected pos 704 vs 598"."""
    monkeypatch.setenv(DRILL_ENOSPC_STEP, "4")
    code = main(tmp_path, "--training.steps", "6", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "1",
                "--checkpoint.async_save", async_save)
    err = capsys.readouterr().err
    assert code == 4, err
    assert re.search(r"checkpoint error: disk full: checkpoint step-4 does not fit in .* the newest good "
                     r"checkpoint, step-2, is intact", err), err
    assert os.listdir(os.path.join(tmp_path, "checkpoint")) == ["step-2"]
    assert config_and_build(tmp_path, "--training.steps", "6").resume_step == 2


def test_a_full_disk_is_recognised_from_the_file_system(tmp_path, monkeypatch):
    """torch.save reports a full disk as "unexpected pos N vs M"; a small probe write that fails
    with ENOSPC is what identifies it."""
    import builtins
    from titan_mm.train import checkpoint as checkpoint_py
    real_open = builtins.open

    def full_disk_open(path, mode="r", *a, **kw):
        if str(path).endswith(".space_probe") and "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", full_disk_open)
    assert checkpoint_py._no_space_left(str(tmp_path))
    monkeypatch.setattr(builtins, "open", real_open)
    assert not checkpoint_py._no_space_left(str(tmp_path))
    assert checkpoint_py._mentions_no_space(RuntimeError("... OSError: [Errno 28] No space left on device"))
    assert not checkpoint_py._mentions_no_space(RuntimeError("unexpected pos 704 vs 598"))


# --- reused dump folders ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A dump folder whose run trained all of its 4 steps (checkpoint step-4)."""
    dump = tmp_path_factory.mktemp("finished") / "run"
    train(dump, "--training.steps", "4", "--checkpoint.interval", "4")
    return dump


def test_asking_for_fewer_steps_than_done_is_refused_before_the_model_is_built(tmp_path, finished_run,
                                                                               monkeypatch, capsys):
    """The README's `--training.steps 50` after the 600-step quick start resumed, trained nothing,
    exited 0 and overwrote losses.json with {}."""
    import train as train_py
    dump = tmp_path / "run"
    shutil.copytree(finished_run, dump)
    before = open(dump / "losses.json").read()
    monkeypatch.setattr(train_py.Trainer, "materialise", lambda *a: pytest.fail("the model was built"))
    assert main(dump, "--training.steps", "2") == 2
    assert re.search(r"training.steps = 2 but checkpoint step-4 in .* has already trained 4 steps; raise "
                     r"training.steps above 4", capsys.readouterr().err)
    assert open(dump / "losses.json").read() == before


def test_a_finished_run_has_nothing_to_do(tmp_path, finished_run):
    dump = tmp_path / "run"
    shutil.copytree(finished_run, dump)
    before = open(dump / "losses.json").read()
    assert main(dump, "--training.steps", "4") == 0
    assert "has already trained all training.steps = 4 steps; nothing to do" in train_log(dump)
    assert open(dump / "losses.json").read() == before
    with pytest.raises(TrainingComplete):
        config_and_build(dump, "--training.steps", "4")


def test_resume_never_refuses_a_folder_with_checkpoints_and_require_an_empty_one(tmp_path, finished_run):
    with pytest.raises(ConfigError, match=r"checkpoint.resume = \"never\" but .* already holds checkpoints \[4\]"):
        config_and_build(finished_run, "--training.steps", "8", "--checkpoint.resume", "never")
    with pytest.raises(ConfigError, match=r"checkpoint.resume = \"require\" but .* holds no checkpoint"):
        config_and_build(tmp_path / "empty", "--training.steps", "8", "--checkpoint.resume", "require")


def test_initial_load_path_is_refused_when_the_checkpoint_started_elsewhere(tmp_path, finished_run):
    """The README's seed example in the quick start's folder ignored the seed and crashed on the
    1-process data state. A run that did start from the seed resumes with it still set (a requeue)."""
    seed = str(tmp_path / "seed")
    sys.path.insert(0, "scripts")
    from create_seed_checkpoint import create_seed_checkpoint
    create_seed_checkpoint(config(tmp_path / "unused"), seed)
    with pytest.raises(ConfigError, match=r"initial_load_hf_path = .*seed, but checkpoint step-4 in .* continues "
                                          r"a run that started from random initialisation.*fresh job.dump_folder"):
        config_and_build(finished_run, "--training.steps", "8", "--checkpoint.initial_load_path", seed)
    from_seed = ["--checkpoint.initial_load_path", seed, "--checkpoint.interval", "2"]
    train(tmp_path / "seeded", "--training.steps", "2", *from_seed)
    assert config_and_build(tmp_path / "seeded", "--training.steps", "4", *from_seed).resume_step == 2


JOB = {"model": "llava/debug", "data_parallel_degree": 1, "num_shards": 0, "initial_load": ""}


@pytest.mark.parametrize("change,message", [
    ({"model": "llava/debug-untied"}, r"holds a llava/debug model and this config trains llava/debug-untied"),
    ({"data_parallel_degree": 2}, r"saved by 1 data-parallel ranks and this run has 2;.*resume with 1 "
                                  r"data-parallel ranks.*data.num_shards"),
    ({"num_shards": 4}, r"saved with data.num_shards = 0 and this config has 4"),
])
def test_a_config_that_cannot_continue_the_checkpoint_is_refused_naming_the_fix(change, message):
    with pytest.raises(ConfigError, match=message):
        check_same_job(JOB, {**JOB, **change}, "checkpoint step-4 in X")
    check_same_job({**JOB, "num_shards": 4}, {**JOB, "num_shards": 4, "data_parallel_degree": 2}, "x")


def test_losses_json_and_tensorboard_hold_every_step_once_across_resumes(tmp_path, monkeypatch):
    """A run checkpoints at step 4 and dies after step 6; the resumed run continues from step 4.
    losses.json holds steps 1-8 (it used to hold only the last process's), TensorBoard shows each
    step once (the dead run's steps 5-6 are purged; they used to show twice), and train.log holds
    both runs."""
    import train as train_py
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    common = ["--training.steps", "8", "--checkpoint.interval", "4", "--metrics.enable_tensorboard", "true"]
    dying = train_py.Trainer(config(tmp_path, *common))
    original = dying.train_step

    def die_after_step_6():
        if dying.train_state.step == 7:
            raise RuntimeError("killed")
        original()

    monkeypatch.setattr(dying, "train_step", die_after_step_6)
    with pytest.raises(RuntimeError, match="killed"):
        dying.train()
    assert sorted(losses_json(tmp_path)) == [1, 2, 3, 4, 5, 6]
    resumed = train(tmp_path, *common)
    history = losses_json(tmp_path)
    assert sorted(history) == list(range(1, 9))
    assert [history[s] for s in (5, 6, 7, 8)] == [loss.item() for loss in resumed.losses]
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 9))
    assert re.findall(r"training 8 steps from step (\d+)", train_log(tmp_path)) == ["0", "4"]
