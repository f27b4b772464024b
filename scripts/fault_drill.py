"""Fault drill: break debug-model runs the ways real runs break, resume them, and print a table of
what happened and whether any step or good checkpoint was lost (docs/reliability.md has a run).

    python scripts/fault_drill.py [--steps 12] [--seed 0] [--only kill,sigterm,...] [--keep DIR]

Every run is a subprocess (train.py, run_train.sh or scripts/slurm.sbatch) on the debug VLM, one
CPU thread each. A run that is resumed must end with the losses of an uninterrupted run, bit for
bit, in losses.json (every step once) and in TensorBoard (every step once).

Faults: kill -9 at random steps; SIGTERM to torchrun (2 ranks); SIGUSR1 to scripts/slurm.sbatch
(the time-limit signal; srun and scontrol are stand-ins that run the task here and record the
requeue); NaN gradients at a step (TITAN_MM_DRILL_NAN_STEPS) under both training.nonfinite
policies; a truncated file, a deleted file and flipped bytes in the newest checkpoint; a full disk
(a small tmpfs when this runs as root, else ENOSPC injected at the writer: TITAN_MM_DRILL_ENOSPC_STEP;
the row says which); a reused dump folder.
"""

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from titan_mm.train.manifest import read_manifest, saved_steps  # noqa: E402
from titan_mm.train.resume import checkpoint_problems  # noqa: E402

CONFIG = "train_configs/debug_vlm.toml"
SMALL = ["--training.seq_len", "128", "--data.image_slots_per_row", "4", "--metrics.log_freq", "1",
         "--checkpoint.interval", "3", "--checkpoint.keep_latest_k", "2", "--checkpoint.export_model_only", "false"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
STEP_LINE = re.compile(r"step\s+(\d+)/(\d+)")


@dataclass
class Row:
    fault: str
    happened: str
    exit_codes: str
    resumed_from: str = "-"
    steps_redone: str = "-"
    record: str = "-"
    """losses.json and TensorBoard: every step once, equal to the uninterrupted run."""
    checkpoint_lost: str = "no"
    """Whether the newest good checkpoint at the time of the fault was lost."""


def run(cmd: list[str], *, env=None, on_step=None, timeout: int = 1200) -> tuple[int, str]:
    """Run ``cmd`` in the repository; ``on_step(step, proc)`` is called at each progress line."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env or ENV, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = STEP_LINE.search(line)
        if match and on_step is not None:
            on_step(int(match.group(1)), proc)
    return proc.wait(timeout=timeout), "".join(lines)


def train_cmd(dump: str, steps: int, *overrides: str) -> list[str]:
    return [sys.executable, "train.py", "--job.config_file", CONFIG, *SMALL, "--job.dump_folder", dump,
            "--training.steps", str(steps), *overrides]


def losses(dump: str) -> dict[int, float]:
    with open(os.path.join(dump, "losses.json")) as f:
        return {int(k): v for k, v in json.load(f).items()}


def tensorboard_steps(dump: str) -> list[int] | None:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return None
    events = EventAccumulator(os.path.join(dump, "tb"))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def record(dump: str, reference: dict[int, float]) -> str:
    """"complete" when losses.json and TensorBoard hold every step once and the losses match."""
    got = losses(dump)
    problems = []
    if sorted(got) != sorted(reference):
        problems.append(f"losses.json steps {sorted(set(reference) - set(got))} missing")
    elif any(got[s] != reference[s] for s in reference):
        problems.append(f"losses differ from step {min(s for s in reference if got[s] != reference[s])}")
    tb = tensorboard_steps(dump)
    if tb is not None and tb != sorted(reference):
        problems.append(f"TensorBoard steps {tb}")
    return "complete, bitwise equal" if not problems else "; ".join(problems)


def newest_good(dump: str) -> int | None:
    folder = os.path.join(dump, "checkpoint")
    good = [s for s in saved_steps(folder)
            if not checkpoint_problems(os.path.join(folder, f"step-{s}"), s, rank=0, world_size=1, group=None)]
    return good[-1] if good else None


def last_step(log: str) -> int:
    """The last step a run logged (log_freq = 1: the last it trained)."""
    return max((int(m.group(1)) for m in STEP_LINE.finditer(log)), default=0)


def resumed_from(log: str) -> str:
    match = re.search(r"training \d+ steps from step (\d+)", log)
    return match.group(1) if match else "?"


def message(log: str, pattern: str) -> str:
    match = re.search(pattern, log)
    return match.group(0) if match else "(no message)"


class Drill:
    def __init__(self, work: str, steps: int, seed: int):
        self.work, self.steps, self.rng = work, steps, random.Random(seed)
        self.rows: list[Row] = []
        self._reference: dict[int, float] | None = None

    def folder(self, name: str) -> str:
        return os.path.join(self.work, name)

    def reference(self) -> dict[int, float]:
        """The losses of an uninterrupted run."""
        if self._reference is None:
            code, log = run(train_cmd(self.folder("reference"), self.steps))
            assert code == 0, log[-3000:]
            self._reference = losses(self.folder("reference"))
        return self._reference

    def stop_at(self, step: int, sig: int, target=None):
        """An on_step callback: send ``sig`` to the process (or ``target(proc)``'s pid) at ``step``."""
        def on_step(seen: int, proc):
            if seen == step and proc.poll() is None:
                os.kill(target(proc) if target else proc.pid, sig)
        return on_step

    def resume_and_check(self, dump: str, last_trained: int, good_before: int | None, reference, cmd=None,
                         env=None) -> Row:
        """Rerun (``cmd``, default the plain train.py command) and compare with ``reference``; the
        steps redone are those after the resumed checkpoint that the faulty run had trained."""
        code, log = run(cmd or train_cmd(dump, self.steps), env=env)
        start = resumed_from(log)
        lost = "no" if good_before is None or start == str(good_before) else f"yes (newest good was step-{good_before})"
        return Row("", "", str(code), start, str(last_trained - int(start)) if start.isdigit() else "?",
                   record(dump, reference), lost)

    # --- the faults ------------------------------------------------------------------------------

    def kill_9(self, repeat: int):
        reference = self.reference()
        for i, step in enumerate(sorted(self.rng.sample(range(2, self.steps), repeat))):
            dump = self.folder(f"kill9-{i}")
            code, log = run(train_cmd(dump, self.steps), on_step=self.stop_at(step, signal.SIGKILL))
            good, cut = newest_good(dump), partials(dump)
            row = self.resume_and_check(dump, last_step(log), good, reference)
            row.fault = f"kill -9 after step {step}"
            row.happened = (f"killed; newest good checkpoint: {f'step-{good}' if good else 'none yet'}"
                            + (f"; {cut} (a save cut short) ignored and removed" if cut else "") + "; rerun resumed")
            row.exit_codes = f"{code}, then {row.exit_codes}"
            self.rows.append(row)

    def sigterm_torchrun(self):
        """SIGTERM to torchrun (2 ranks through run_train.sh): both save at the end of the step, exit 0."""
        env = dict(ENV, NGPU="2", CONFIG_FILE=CONFIG)
        launch = lambda dump: ["./run_train.sh", *SMALL, "--job.dump_folder", dump,  # noqa: E731
                               "--training.steps", str(self.steps), "--parallelism.data_parallel_shard_degree", "2"]
        code, log = run(launch(self.folder("reference-2ranks")), env=env)
        assert code == 0, log[-3000:]
        reference = losses(self.folder("reference-2ranks"))
        dump = self.folder("sigterm")
        step = self.steps // 2
        code, log = run(launch(dump), env=env, on_step=self.stop_at(step, signal.SIGTERM))
        preempted = message(log, r"preempted \(SIGTERM\) at step \d+: saved checkpoint step-\d+")
        good = newest_good(dump)
        files = sorted(read_manifest(os.path.join(dump, "checkpoint", f"step-{good}"))["files"]) if good else []
        row = self.resume_and_check(dump, last_step(log), good, reference, cmd=launch(dump), env=env)
        row.fault = f"SIGTERM to torchrun after step {step} (2 ranks)"
        row.happened = f"{preempted} (files {', '.join(files)}); torchrun exit {code}; rerun resumed"
        row.exit_codes = f"{code}, then {row.exit_codes}"
        self.rows.append(row)

    def slurm_time_limit(self):
        """SIGUSR1 to scripts/slurm.sbatch (what --signal=B:USR1@300 sends): save, exit, requeue."""
        reference = self.reference()
        fake = self.folder("fake-slurm")
        os.makedirs(fake, exist_ok=True)
        requeued = os.path.join(fake, "requeued")
        write_script(os.path.join(fake, "srun"), 'shift; exec "$@"')  # drop --kill-on-bad-exit, run the task here
        write_script(os.path.join(fake, "scontrol"),
                     f'if [ "$1" = show ]; then echo localhost; else echo "$@" >> {requeued}; fi')
        dump = self.folder("slurm")
        env = dict(ENV, PATH=fake + os.pathsep + ENV["PATH"], SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES="1",
                   SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="4242", NGPU="1", CONFIG_FILE=CONFIG)
        cmd = ["bash", "scripts/slurm.sbatch", *SMALL, "--job.dump_folder", dump, "--training.steps", str(self.steps)]
        step = self.steps // 2
        code, log = run(cmd, env=env, on_step=self.stop_at(step, signal.SIGUSR1))
        good = newest_good(dump)
        requeue = open(requeued).read().split() if os.path.exists(requeued) else []
        row = self.resume_and_check(dump, last_step(log), good, reference, cmd=cmd, env=env)
        row.fault = f"SIGUSR1 to slurm.sbatch after step {step} (the time-limit signal)"
        row.happened = (f"saved step-{good}, sbatch exit {code}, `scontrol {' '.join(requeue) or '(not called)'}`; "
                        f"the requeued job resumed")
        row.exit_codes = f"{code}, then {row.exit_codes}"
        self.rows.append(row)

    def nan(self):
        step = self.steps // 2 - 1
        cases = [("skip", str(step), [], f"NaN gradients at step {step}, nonfinite = skip"),
                 ("skip", f"{step}-", [], f"NaN gradients from step {step} on, nonfinite = skip"),
                 ("stop", str(step), ["--training.nonfinite", "stop"], f"NaN gradients at step {step}, nonfinite = stop")]
        for policy, spec, extra, fault in cases:
            dump = self.folder(f"nan-{policy}-{spec}")
            code, log = run(train_cmd(dump, self.steps, *extra), env=dict(ENV, TITAN_MM_DRILL_NAN_STEPS=spec))
            skipped = re.findall(r"non-finite steps skipped (\d+)", log)
            finite = all_finite(dump)
            if code == 0:
                happened = f"step {step}'s update dropped ({skipped[-1] if skipped else 0} counted); run finished"
            else:
                happened = message(log, r"(steps? \d+(-\d+)? (all )?had a non-finite loss or gradient norm)")
            steps = sorted(losses(dump))
            self.rows.append(Row(fault, happened, str(code), "-", "-",
                                 f"losses.json steps {steps[0]}-{steps[-1]}",
                                 f"no: {len(saved_steps(os.path.join(dump, 'checkpoint')))} checkpoints, "
                                 f"{'all finite' if finite else 'NOT ALL FINITE'}"))

    def damaged(self):
        """The newest checkpoint damaged three ways; the rerun falls back to the one before it."""
        reference = self.reference()
        half = self.folder("half")
        stop = 3 * (self.steps // 3 - 1)  # a checkpoint step before the end
        code, _ = run(train_cmd(half, self.steps), on_step=self.stop_at(stop, signal.SIGTERM))
        newest = saved_steps(os.path.join(half, "checkpoint"))[-1]
        for how in ("truncated", "deleted", "flipped"):
            dump = self.folder(f"damaged-{how}")
            shutil.copytree(half, dump)
            folder = os.path.join(dump, "checkpoint", f"step-{newest}")
            damage(folder, how)
            good = newest_good(dump)
            code, log = run(train_cmd(dump, self.steps))
            report = re.sub(r" \(\S+\)", "", message(log, r"checkpoint step-\d+ \(\S+\) is damaged: [^;]+"), count=1)
            row = Row(f"{how} __0_0.distcp in the newest checkpoint (step-{newest})",
                      report + "; fell back to the one before", str(code),
                      resumed_from(log), str(newest - int(resumed_from(log))), record(dump, reference),
                      "no" if resumed_from(log) == str(good) else f"yes (step-{good} was good)")
            self.rows.append(row)

    def full_disk(self):
        reference = self.reference()
        mount = self.folder("tmpfs")
        os.makedirs(mount, exist_ok=True)
        real = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=130m", "tmpfs", mount],
                                                    capture_output=True).returncode == 0
        dump = os.path.join(mount, "run")
        env = ENV if real else dict(ENV, TITAN_MM_DRILL_ENOSPC_STEP="9")
        try:
            code, log = run(train_cmd(dump, self.steps), env=env)
            good = newest_good(dump)
            said = message(log, r"disk full: [^;]+")
            if real:
                subprocess.run(["mount", "-o", "remount,size=400m", mount], check=True)
            row = self.resume_and_check(dump, last_step(log), good, reference)
            row.fault = ("full disk: a 130 MiB tmpfs (2 checkpoints fit, not 3)" if real
                         else "full disk: ENOSPC injected at the writer (not root: no tmpfs)")
            row.happened = said.replace(mount, "TMPFS") + f"; newest good step-{good} kept; rerun with space resumed"
            row.exit_codes = f"{code}, then {row.exit_codes}"
            self.rows.append(row)
        finally:
            if real:
                shutil.rmtree(dump, ignore_errors=True)
                subprocess.run(["umount", mount])

    def reused_folder(self):
        self.reference()
        source = self.folder("reference")
        sys.path.insert(0, os.path.join(ROOT, "scripts"))
        seed = self.folder("seed")
        subprocess.run([sys.executable, "scripts/create_seed_checkpoint.py", "--job.config_file", CONFIG, seed],
                       cwd=ROOT, env=ENV, check=True, capture_output=True)
        cases = [(["--training.steps", str(self.steps // 2)], f"rerun with --training.steps {self.steps // 2}",
                  r"config error: training.steps = \d+ but checkpoint step-\d+ .* has already trained \d+ steps"),
                 ([], "rerun of the finished command", r"checkpoint step-\d+ .* has already trained all [^;]+; nothing to do"),
                 (["--checkpoint.initial_load_path", seed], "rerun with --checkpoint.initial_load_path (a seed)",
                  r"config error: .* continues a run that started from random initialisation")]
        for extra, fault, pattern in cases:
            dump = self.folder(f"reused-{len(self.rows)}")
            shutil.copytree(source, dump)
            before = open(os.path.join(dump, "losses.json")).read()
            cmd = train_cmd(dump, self.steps)
            code, log = run(cmd + extra)
            unchanged = open(os.path.join(dump, "losses.json")).read() == before
            said = message(log, pattern).replace(dump, "DUMP").replace(seed, "SEED")
            self.rows.append(Row(f"reused dump folder: {fault}", said, str(code), "-", "-",
                                 "losses.json unchanged" if unchanged else "losses.json CHANGED"))


def partials(dump: str) -> str:
    folder = os.path.join(dump, "checkpoint")
    names = [n for n in os.listdir(folder) if n.endswith(".partial")] if os.path.isdir(folder) else []
    return ", ".join(names)


def all_finite(dump: str) -> bool:
    import torch
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    folder = os.path.join(dump, "checkpoint")
    for step in saved_steps(folder):
        weights = _load_state_dict_from_keys({"model"}, checkpoint_id=os.path.join(folder, f"step-{step}"))["model"]
        if not all(torch.isfinite(w).all() for w in weights.values()):
            return False
    return True


def damage(folder: str, how: str):
    path = os.path.join(folder, "__0_0.distcp")
    if how == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    elif how == "deleted":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            chunk = f.read(16)
            f.seek(os.path.getsize(path) // 2)
            f.write(bytes(b ^ 0xFF for b in chunk))


def write_script(path: str, body: str):
    with open(path, "w") as f:
        f.write(f"#!/usr/bin/env bash\n{body}\n")
    os.chmod(path, 0o755)


def table(rows: list[Row]) -> str:
    head = ("| fault | what happened | exit codes | resumed from | steps redone | losses.json + TensorBoard | "
            "good checkpoint lost |\n|---|---|---|---|---|---|---|")
    return "\n".join([head] + [f"| {r.fault} | {r.happened} | {r.exit_codes} | {r.resumed_from} | {r.steps_redone} "
                               f"| {r.record} | {r.checkpoint_lost} |" for r in rows])


FAULTS = ("kill", "sigterm", "slurm", "nan", "damaged", "disk", "reused")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="picks the kill -9 steps")
    parser.add_argument("--only", default=",".join(FAULTS), help=f"comma-separated subset of {FAULTS}")
    parser.add_argument("--keep", default="", help="work in this folder and keep it (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="fault_drill_")
    drill = Drill(work, args.steps, args.seed)
    chosen = args.only.split(",")
    try:
        for fault, action in [("kill", lambda: drill.kill_9(3)), ("sigterm", drill.sigterm_torchrun),
                              ("slurm", drill.slurm_time_limit), ("nan", drill.nan), ("damaged", drill.damaged),
                              ("disk", drill.full_disk), ("reused", drill.reused_folder)]:
            if fault in chosen:
                print(f"--- {fault}", file=sys.stderr, flush=True)
                action()
    finally:
        print(table(drill.rows))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
