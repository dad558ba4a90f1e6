"""Configuration: the typed dataclasses of a run (`schema`) and how they are read (`loader`).

`schema` holds only dataclasses and their validation; `loader` reads YAML files and packaged
presets, applies `dotted.key=value` overrides and builds the dataclasses, with every error naming
the dotted key. Both are re-exported here: `from engram_jax.config import load_config`.
"""

from engram_jax.config.loader import (apply_overrides, config_path, config_to_dict, from_dict,
                                      load_config, load_engram_config, load_model_config,
                                      load_yaml, merge_nested, preset_names)
from engram_jax.config.schema import (DATA_SOURCES, DTYPES, ENGRAM_FUSIONS, ENGRAM_LOOKUPS,
                                      MESH_AXES, REMAT_POLICIES, SCHEDULES, STREAM_MERGES,
                                      Config, ConfigError, DataConfig, EngramConfig, MixtureSource,
                                      ModelConfig, MoEConfig, ShardingConfig, TrainConfig)

__all__ = [
    "DATA_SOURCES", "DTYPES", "ENGRAM_FUSIONS", "ENGRAM_LOOKUPS", "MESH_AXES", "REMAT_POLICIES",
    "SCHEDULES", "STREAM_MERGES", "Config", "ConfigError", "DataConfig", "EngramConfig",
    "MixtureSource", "ModelConfig", "MoEConfig", "ShardingConfig", "TrainConfig", "apply_overrides",
    "config_path", "config_to_dict", "from_dict", "load_config", "load_engram_config",
    "load_model_config", "load_yaml", "merge_nested", "preset_names",
]
