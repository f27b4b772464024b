"""Config: TOML + overrides, and bad keys or values stop the run with a message naming them."""

import subprocess
import sys

import pytest

from titan_mm.config import ConfigError, JobConfig, field_docs, load_toml, parse_args, to_toml

DEBUG = "train_configs/debug_vlm.toml"


def test_toml_and_overrides_merge():
    cfg, _ = parse_args(["--job.config_file", DEBUG, "--training.steps", "7", "--optimizer.lr=0.01",
                         "--checkpoint.enable", "false"])
    assert cfg.training.steps == 7 and cfg.optimizer.lr == 0.01 and cfg.checkpoint.enable is False
    assert cfg.data.patches_per_slot == 64  # from the TOML file


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'training.stepz'.*bad.toml"):
        parse_args(["--job.config_file", str(bad)])


def test_unknown_section_and_override():
    with pytest.raises(ConfigError, match="unknown config section 'trainin'"):
        parse_args(["--trainin.steps", "3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'model.flavour'.*command line"):
        parse_args(["--model.flavour", "x"])


@pytest.mark.parametrize("old,new", [("max_images_per_row", "image_slots_per_row"),
                                     ("max_patches_per_image", "patches_per_slot")])
def test_renamed_data_keys_name_their_new_key(tmp_path, old, new):
    """The image budget keys of earlier versions, in a file or on the command line, stop the run
    with a message that names the key to use instead."""
    old_file = tmp_path / "old.toml"
    old_file.write_text(f"[data]\n{old} = 8\n")
    with pytest.raises(ConfigError, match=rf"data.{old} \(.*old.toml\) is now data.{new}.*rename it"):
        parse_args(["--job.config_file", str(old_file)])
    with pytest.raises(ConfigError, match=rf"data.{old} \(command line\) is now data.{new}"):
        parse_args([f"--data.{old}", "8"])


@pytest.mark.parametrize("arg,value,message", [
    ("training.steps", "ten", "expects an integer"),
    ("training.steps", "0", "must be > 0"),
    ("optimizer.lr", "fast", "expects a number"),
    ("checkpoint.enable", "maybe", "expects true or false"),
    ("lr_scheduler.decay_type", "exp", "is not one of"),
    ("lr_scheduler.min_lr_ratio", "2", r"must be in \[0, 1\]"),
    ("activation_checkpoint.mode", "some", "is not one of"),
    ("activation_checkpoint.selective_ac_option", "0", r'must be "op" or an integer >= 1'),
])
def test_wrong_type_or_impossible_value(arg, value, message):
    with pytest.raises(ConfigError, match=f"{arg}.*{message}|{message}"):
        parse_args([f"--{arg}", value])


def test_merged_config_round_trips_through_toml(tmp_path):
    cfg, _ = parse_args(["--job.config_file", DEBUG, "--training.steps", "11"])
    path = tmp_path / "merged.toml"
    path.write_text(to_toml(cfg))
    again = JobConfig()
    load_toml(again, str(path))
    assert again == cfg


def test_every_field_has_a_docstring():
    import dataclasses
    for section in dataclasses.fields(JobConfig):
        cls = section.default_factory
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
        assert not missing, f"[{section.name}] fields without a docstring: {missing}"


def test_cli_reports_config_errors_before_building_anything():
    out = subprocess.run([sys.executable, "train.py", "--job.config_file", DEBUG, "--data.bogus", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "unknown config key 'data.bogus'" in out.stderr
    assert "model llava" not in out.stdout + out.stderr  # stopped before the model was built


@pytest.mark.parametrize("args,message", [
    (["--data.path", "no/such/captions.jsonl"], "data file no/such/captions.jsonl not found"),
    (["--data.dataset", "webdataset", "--data.path", "no/such/*.tar"], "no .tar shards match 'no/such/"),
    (["--model.tokenizer_path", "no/such/tokenizer"], "no tokenizer.json in no/such/tokenizer"),
    (["--model.name", "gpt5"], "unknown model.name 'gpt5'"),
    (["--data.max_pixels", "16384"], "raise patches_per_slot to 256 or lower max_pixels to 4096"),
    (["--data.patches_per_slot", "66", "--data.max_pixels", "4000"], "multiple of the merge area 4"),
    (["--checkpoint.initial_load_hf_path", "no/such/hf"], "no config.json in no/such/hf"),
])
def test_bad_paths_and_budgets_are_one_line_before_the_model_is_built(tmp_path, capsys, args, message):
    """Input errors found by the trainer (not by parse_args) still stop the CLI (train.main) with
    exit code 2 and one 'config error:' line naming the fix, before the model is built (a traceback
    would fail the test)."""
    import train
    code = train.main(["--job.config_file", DEBUG, "--job.dump_folder", str(tmp_path / "run"), *args])
    out = capsys.readouterr()
    assert code == 2, out.err
    assert len(out.err.splitlines()) == 1 and out.err.startswith("config error: "), out.err
    assert message in out.err
    assert "parameters" not in out.out + out.err  # 'model llava/debug: 4.23M parameters'


def test_print_config_prints_merged_toml():
    out = subprocess.run([sys.executable, "train.py", "--job.config_file", DEBUG, "--training.steps", "5",
                          "--print-config"], capture_output=True, text=True, check=True)
    assert "[training]\nsteps = 5" in out.stdout


@pytest.mark.parametrize("path", sorted(f"train_configs/{f}" for f in __import__("os").listdir("train_configs")))
def test_every_bundled_config_parses_and_names_a_real_flavor(path):
    from titan_mm.data.dataloader import check_image_budget
    from titan_mm.models import get_model_spec
    cfg, _ = parse_args(["--job.config_file", path])
    args = get_model_spec(cfg.model.name).flavors[cfg.model.flavor]
    spec = args.vision_input
    check_image_budget(cfg.data, spec)
