import pytest

from omni.config import Config, ConfigError, load_config, parse_overrides, presets


def test_defaults_are_tiny_recipe():
    cfg = load_config("tiny")
    assert cfg.name == "tiny"
    assert cfg.model.backbone.hidden_size == 256
    assert cfg.model.image.patch_size == 8
    assert cfg.train.betas == (0.9, 0.95)


def test_dotted_overrides_typed():
    cfg = load_config("tiny", ["train.lr=3e-4", "model.head.width=512", "data.train=[a.tar,b.tar]",
                               "model.backbone.num_kv_heads=null", "train.betas=[0.8,0.9]"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert isinstance(cfg.train.lr, float)
    assert cfg.model.head.width == 512
    assert cfg.data.train == ["a.tar", "b.tar"]
    assert cfg.model.backbone.num_kv_heads is None
    assert cfg.train.betas == (0.8, 0.9)


def test_int_promoted_to_float_but_not_reverse():
    assert load_config("tiny", ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        load_config("tiny", ["train.steps=1.5"])


def test_unknown_key_names_closest():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["train.learning_rate=1e-3"])
    assert "train.learning_rate" in str(e.value)
    with pytest.raises(ConfigError, match="did you mean model.head.width"):
        load_config("tiny", ["model.head.widht=3"])


def test_wrong_type_and_literal():
    with pytest.raises(ConfigError, match="model.head.parameterization"):
        load_config("tiny", ["model.head.parameterization=x0"])
    with pytest.raises(ConfigError, match="train.ema_decay: expected a number"):
        load_config("tiny", ["train.ema_decay=abc"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_overrides(["train.lr"])


def test_yaml_file_with_base_and_roundtrip(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("base: tiny\ntrain:\n  steps: 7\n")
    cfg = load_config(f)
    assert cfg.train.steps == 7 and cfg.model.backbone.hidden_size == 256
    out = tmp_path / "resolved.yaml"
    cfg.save(out)
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()


def test_unknown_preset_lists_presets():
    assert "tiny" in presets()
    with pytest.raises(ConfigError, match="Presets:"):
        load_config("tinyy")


def test_every_preset_loads():
    for name in presets():
        assert isinstance(load_config(name), Config)
