"""Config: inheritance, overrides, and errors that name the key and the fix."""
from pathlib import Path

import pytest

from twinbrain.config import (Config, ConfigError, config_from_dict, dump_config, load_config,
                              parse_overrides)

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.model.hidden == 128 and cfg.model.blocks == 4


@pytest.mark.parametrize("name", ["default", "quickstart", "smoke"])
def test_shipped_configs_resolve(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.data.source == "simulated"


def test_base_inheritance_and_deep_merge(tmp_path):
    write(tmp_path / "base.yaml", "model:\n  hidden: 32\n  blocks: 3\ntrain:\n  lr: 0.01\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nmodel:\n  hidden: 64\n")
    cfg = load_config(child)
    assert cfg.model.hidden == 64      # child wins
    assert cfg.model.blocks == 3       # inherited, not reset to the default
    assert cfg.train.lr == 0.01


def test_multi_level_inheritance_and_cycle(tmp_path):
    write(tmp_path / "a.yaml", "train:\n  max_steps: 111\n")
    write(tmp_path / "b.yaml", "base: a.yaml\ntrain:\n  batch_size: 3\n")
    c = write(tmp_path / "c.yaml", "base: b.yaml\ntrain:\n  lr: 0.5\n")
    cfg = load_config(c)
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr) == (111, 3, 0.5)
    write(tmp_path / "x.yaml", "base: y.yaml\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "x.yaml")


def test_cli_overrides_win_over_file(tmp_path):
    f = write(tmp_path / "c.yaml", "train:\n  lr: 0.01\n")
    cfg = load_config(f, ["--train.lr", "3e-4", "--model.hidden=64", "--eval.horizons", "[1, 2]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.hidden == 64
    assert cfg.eval.horizons == [1, 2]


def test_override_parsing_shapes():
    assert parse_overrides(["--a.b", "1", "--a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["--train.lr"])
    with pytest.raises(ConfigError, match="section and a key"):
        parse_overrides(["--lr", "1"])


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.lrr'.*did you mean 'train.lr'"):
        load_config(None, ["--train.lrr", "1e-3"])
    f = write(tmp_path / "c.yaml", "modle:\n  hidden: 3\n")
    with pytest.raises(ConfigError, match="did you mean 'model'"):
        load_config(f)


@pytest.mark.parametrize("override, match", [
    (["--model.hidden", "abc"], "model.hidden: expected an integer"),
    (["--train.lr", "fast"], "train.lr: expected a number"),
    (["--model.temporal_attention", "3"], "expected true or false"),
    (["--train.scheduler", "linear"], "train.scheduler: 'linear' is not one of"),
    (["--model.hidden", "-4"], "model.hidden: must be > 0"),
])
def test_wrong_types_and_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, override)


def test_impossible_combinations_fail_before_work():
    # window shorter than the forecast horizon
    with pytest.raises(ConfigError, match="data.window_s.*too short.*forecast_steps"):
        load_config(None, ["--data.window_s", "8", "--model.forecast_steps", "4"])
    # k-NN larger than the node count
    with pytest.raises(ConfigError, match="graph.k_fmri.*n_regions"):
        load_config(None, ["--graph.k_fmri", "90", "--sim.n_regions", "80"])
    # no subject left for training
    with pytest.raises(ConfigError, match="no training subject"):
        load_config(None, ["--sim.n_subjects", "2"])
    # early-stopping patience longer than the run
    with pytest.raises(ConfigError, match="early_stop_patience"):
        load_config(None, ["--train.early_stop_patience", "5", "--train.max_steps", "300",
                           "--train.eval_every", "100"])
    # EEG latent grid must align with fMRI volumes
    with pytest.raises(ConfigError, match="eeg_stride"):
        load_config(None, ["--model.eeg_stride", "64", "--model.eeg_patch", "64"])
    with pytest.raises(ConfigError, match="eval.horizons"):
        load_config(None, ["--eval.horizons", "[1, 8]"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path / "list.yaml", "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path / "bad.yaml", "train: [1,\n"))


def test_resolved_config_round_trips():
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["--train.lr", "0.002"])
    import yaml
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_a_key_nothing_reads_is_refused_but_old_saved_configs_still_load():
    with pytest.raises(ConfigError, match="parallel.compile"):
        load_config(None, ["--parallel.compile", "false"])
    saved = Config().to_dict()
    saved["parallel"]["compile"] = False            # what every config saved before the key was retired holds
    assert config_from_dict(saved) == Config()


def test_a_saved_config_without_an_added_key_rebuilds_what_it_trained():
    """An export saved before ``model.eeg_core`` existed had the anchored EEG forecast: it rebuilds that
    model (config.ADDED_KEYS), while a config that names the key keeps its value."""
    saved = Config().to_dict()
    assert saved["model"]["eeg_core"] is True
    del saved["model"]["eeg_core"]
    assert config_from_dict(saved).model.eeg_core is False
    assert config_from_dict(Config().to_dict()).model.eeg_core is True


def test_one_policy_of_what_may_change_after_training():
    from twinbrain.config import LOCATION_KEYS, fixed_keys, flatten, with_overrides
    assert fixed_keys(["run.out", "train.max_skipped_fraction", "eval.split", "train.lr"], "resume") == ["train.lr"]
    assert fixed_keys(["eval.horizons", *LOCATION_KEYS, "data.window_s"], "evaluate") == ["data.window_s"]
    assert fixed_keys(["data.bids_root", "data.window_s"], "twin") == ["data.window_s"]
    cfg = Config()
    assert with_overrides(cfg, {"eval": {"horizons": [1]}}).eval.horizons == [1] and cfg.eval.horizons != [1]
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": [{"e": 3}]}) == {"a.b": 1, "a.c": [1, 2], "d.0.e": 3}
