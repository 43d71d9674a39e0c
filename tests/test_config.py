"""Config loading: --config-name, dotted key=value overrides, clear errors naming the key."""
import pytest

import data
import train_vae
from helpers import run_script


def parse(*argv):
    return train_vae.parse_args(list(argv))[1]


def test_config_name_loads_the_shipped_yaml_and_overrides_apply():
    config = parse("--config-name", "dgt_normal", "name=x", "train.lr=5e-4", "+data.dataset.root=/d")
    assert config["data"]["transform"]["n_fft"] == 2048 and config["data"]["transform"]["hop"] == 512
    assert config["train"]["lr"] == 5e-4 and config["name"] == "x"
    assert config["data"]["dataset"]["root"] == "/d"  # leading + means the same


def test_values_are_yaml_scalars():
    config = parse("--config-name", "dgt_mid", "model.encoder_hidden=[64, 32]", "train.max_epochs=3",
                   "data.dataset.n_files=null", "+check=1")
    assert config["model"]["encoder_hidden"] == [64, 32]
    assert config["train"]["max_epochs"] == 3 and config["check"] == 1


def test_a_path_to_any_yaml_works(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  latent_dim: 3\n")
    assert parse("--config-name", str(path))["model"]["latent_dim"] == 3


def test_every_shipped_config_parses():
    names = data.list_configs(train_vae.CONFIG_DIR)
    for required in ("dgt_low", "dgt_mid", "dgt_high", "dgt_normal", "dgt_precise", "dgt_pitch_cond",
                     "dgt_pitch_prediction"):
        assert required in names
    for name in names:
        config = parse("--config-name", name)
        hop = config["data"]["transform"]["hop"]
        assert hop & (hop - 1) == 0, f"{name}: hop must be a power of two for the nn~ export"
    cond = parse("--config-name", "dgt_pitch_prediction")["model"]
    assert set(cond["conditioning"]) == {"pitch", "octave"} and set(cond["prediction"]) == {"pitch", "octave"}


@pytest.mark.parametrize("override, key", [
    ("train.learning_rate=1", "train.learning_rate"),
    ("+modle.latent_dim=4", "modle"),
    ("data.dataset.rot=/x", "data.dataset.rot"),
])
def test_unknown_key_is_an_error_naming_the_key(override, key):
    with pytest.raises(data.ConfigError, match=f"'{key}'"):
        parse("--config-name", "dgt_mid", override)


@pytest.mark.parametrize("override, key", [
    ("train.lr=fast", "train.lr"),
    ("train.batch_size=1.5", "train.batch_size"),
    ("model.latent_dim=[1]", "model.latent_dim"),
])
def test_wrong_type_is_an_error_naming_the_key(override, key):
    with pytest.raises(data.ConfigError, match=f"'{key}'"):
        parse("--config-name", "dgt_mid", override)


def test_task_sections_are_checked():
    with pytest.raises(data.ConfigError, match="model.conditioning.pitch.dimension"):
        parse("--config-name", "dgt_pitch_cond", "+model.conditioning.pitch.dimension=3")
    with pytest.raises(data.ConfigError, match="no data.dataset.metadata_callbacks.color"):
        parse("--config-name", "dgt_mid", "+model.conditioning.color.dim=3")
    with pytest.raises(data.ConfigError, match="target"):
        parse("--config-name", "dgt_pitch_cond", "model.conditioning.pitch.target=[middle]")


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(data.ConfigError, match="dgt_mid"):
        parse("--config-name", "dgt_nonexistent")


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  latent_dim: 3\n   bad: [\n")
    with pytest.raises(data.ConfigError, match=r"bad.yaml:\d+"):
        parse("--config-name", str(path))


def test_help_lists_configs_and_keys():
    code, out, _ = run_script("train_vae.py", "--help")
    assert code == 0
    assert "dgt_pitch_prediction" in out and "data.dataset.root" in out and "train.max_steps" in out


def test_cli_error_is_one_line_without_traceback():
    code, out, err = run_script("train_vae.py", "--config-name", "dgt_mid", "train.lrr=1")
    assert code == 2
    assert "Traceback" not in err and "train.lrr" in err and len(err.strip().splitlines()) == 1
