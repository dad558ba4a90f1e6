"""Engram configuration: validation names the bad field; YAML presets load."""

import pathlib

import pytest

from engram_jax.config import ConfigError, EngramConfig, load_engram_config

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("overrides, field", [
    (dict(max_ngram_size=1, vocab_size_per_ngram=()), "engram.max_ngram_size=1"),
    (dict(vocab_size_per_ngram=(1000,)), "engram.vocab_size_per_ngram"),
    (dict(vocab_size_per_ngram=(1, 1000)), "engram.vocab_size_per_ngram"),
    (dict(n_embed_per_ngram=100), "engram.n_embed_per_ngram=100"),
    (dict(n_head_per_ngram=0), "engram.n_head_per_ngram=0"),
    (dict(layer_ids=(1, 1)), "engram.layer_ids"),
    (dict(layer_ids=(-1,)), "engram.layer_ids"),
    (dict(kernel_size=0), "engram.kernel_size=0"),
    (dict(conv_dilation=0), "engram.conv_dilation=0"),
    (dict(pad_id=-2), "engram.pad_id=-2"),
])
def test_invalid_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace("(", "\\(")):
        EngramConfig(**overrides)


def test_derived_sizes_of_the_demo_config():
    config = EngramConfig()
    assert (config.num_heads, config.head_dim, config.embed_dim, config.dilation) == (16, 64, 1024, 3)


def test_demo_preset_is_the_reference_config():
    assert load_engram_config(CONFIGS / "engram_demo.yaml") == EngramConfig(conv_zero_init=False)


def test_yaml_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_engram_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("engram:\n  max_ngram: 3\n")
    with pytest.raises(ConfigError, match="unknown key engram.max_ngram "):
        load_engram_config(bad)
    (tmp_path / "none.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="no 'engram' section"):
        load_engram_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("preset", ["tiny", "small", "dense", "moe", "engram_moe",
                                    "paper_moe27b", "paper_engram27b"])
def test_presets_load(preset):
    from engram_jax.config import ModelConfig, load_model_config

    assert isinstance(load_model_config(CONFIGS / f"{preset}.yaml"), ModelConfig)


@pytest.mark.parametrize("overrides, message", [
    (dict(num_layers=2, engram=EngramConfig(layer_ids=(1, 15))),
     "model.engram.layer_ids=\\(1, 15\\): layer 15 is beyond the depth"),
    (dict(hidden_size=100, num_heads=3), "model.hidden_size=100: must be divisible by num_heads"),
    (dict(num_heads=4, num_kv_heads=3), "model.num_kv_heads=3"),
    (dict(dtype="float8"), "model.dtype='float8'"),
    (dict(stream_merge="max"), "model.stream_merge='max'"),
    (dict(remat="some"), "model.remat='some'"),
])
def test_model_config_errors_name_the_field(overrides, message):
    from engram_jax.config import ModelConfig

    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


def test_nested_unknown_keys_and_base_chain(tmp_path):
    from engram_jax.config import load_model_config

    (tmp_path / "a.yaml").write_text("model:\n  hidden_size: 64\n  moe:\n    top_k: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel:\n  num_heads: 2\n")
    config = load_model_config(tmp_path / "b.yaml")
    assert (config.hidden_size, config.num_heads, config.moe.top_k) == (64, 2, 1)
    (tmp_path / "c.yaml").write_text("model:\n  moe:\n    topk: 1\n")
    with pytest.raises(ConfigError, match="unknown key model.moe.topk"):
        load_model_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: d.yaml\nmodel: {}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_model_config(tmp_path / "d.yaml")
    from engram_jax.config import MoEConfig

    with pytest.raises(ConfigError, match="model.moe.top_k=9"):
        MoEConfig(num_routed_experts=4, top_k=9)


def test_values_are_type_checked_and_numbers_coerced(tmp_path):
    from engram_jax.config import load_config

    (tmp_path / "c.yaml").write_text("train:\n  learning_rate: 1e-3\n  steps: 10\n")
    config = load_config(tmp_path / "c.yaml", ["train.weight_decay=0", "model.moe.top_k=1"])
    assert config.train.learning_rate == 1e-3 and config.train.weight_decay == 0.0
    assert config.model.moe.top_k == 1
    with pytest.raises(ConfigError, match="train.steps='ten': expected int"):
        load_config(tmp_path / "c.yaml", ["train.steps=ten"])
    with pytest.raises(ConfigError, match="unknown key train.stepz"):
        load_config(tmp_path / "c.yaml", ["train.stepz=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(tmp_path / "c.yaml", ["train.steps"])


def test_presets_ship_with_the_package_and_load_by_name(tmp_path, monkeypatch):
    from engram_jax.config import config_path, load_config, preset_names

    assert preset_names() == sorted(p.name for p in CONFIGS.glob("*.yaml"))
    monkeypatch.chdir(tmp_path)  # away from the source tree's configs/
    for name in ("tiny", "tiny.yaml", "configs/tiny.yaml"):
        assert load_config(name) == load_config(CONFIGS / "tiny.yaml"), name
    assert config_path("small").read_text() == (CONFIGS / "small.yaml").read_text()
    with pytest.raises(FileNotFoundError, match="nope does not exist .*presets: dense, "):
        load_config("nope")
    with pytest.raises(FileNotFoundError, match="elsewhere/tiny.yaml does not exist"):
        load_config("elsewhere/tiny.yaml")


def test_tuple_elements_are_checked_and_one_path_is_a_list_of_one():
    from engram_jax.config import load_config

    with pytest.raises(ConfigError, match=r"model.engram.layer_ids\[0\]='a': expected int"):
        load_config(CONFIGS / "tiny.yaml", ['model.engram.layer_ids=["a"]'])
    with pytest.raises(ConfigError, match=r"vocab_size_per_ngram\[1\]=2.5: expected int"):
        load_config(CONFIGS / "tiny.yaml", ["model.engram.vocab_size_per_ngram=[101, 2.5]"])
    config = load_config(CONFIGS / "tiny.yaml", ["data.source=text", "data.paths=book.txt",
                                                 "sharding.engram_table_axes=data"])
    assert config.data.paths == ("book.txt",) and config.sharding.engram_table_axes == ("data",)
