"""The optimiser (paper §4.1): AdamW for the backbone, Adam at a multiple of the learning rate
with no weight decay for Engram table rows, no decay on norms, biases and mHC gates; warm-up then
cosine or step decay; global-norm clipping over all gradients."""

from __future__ import annotations

import jax
import optax

from engram_jax.config.schema import TrainConfig

BACKBONE, NO_DECAY, ENGRAM_TABLE = "backbone", "no_decay", "engram_table"
NO_DECAY_NAMES = frozenset({"scale", "key_norm", "query_norm", "conv_norm", "key_bias",
                            "value_bias", "bias_pre", "bias_post", "bias_res", "gates", "gate",
                            "bias"})


def _names(path) -> list[str]:
    return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def param_label(path) -> str:
    """Which transform a parameter gets, from its path in the model state."""
    names = _names(path)
    if "engram" in names and names[-1] == "table":
        return ENGRAM_TABLE
    if names[-1] in NO_DECAY_NAMES:
        return NO_DECAY
    return BACKBONE


def param_labels(params):
    """The label tree of a parameter tree (for `optax.multi_transform`)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_label(path), params)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then cosine / step decay or constant."""
    peak, warmup, steps = config.learning_rate, config.warmup_steps, config.steps
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1),
                                                  end_value=peak * config.min_lr_ratio)
    ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
    if config.schedule == "step":
        after = optax.piecewise_constant_schedule(
            peak, {int(0.8 * steps) - warmup: 0.1, int(0.9 * steps) - warmup: 0.1})
    else:
        after = optax.constant_schedule(peak)
    return optax.join_schedules([ramp, after], [warmup])


ADAM_EPS = 1e-8


def table_learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """The Engram tables' schedule: `engram_lr_multiplier` x the backbone's."""
    schedule = learning_rate_schedule(config)
    return lambda step: config.engram_lr_multiplier * schedule(step)


def make_optimizer(config: TrainConfig, *, clip: bool = True) -> optax.GradientTransformation:
    """clip -> {backbone: AdamW, no_decay: Adam, engram_table: Adam x engram_lr_multiplier};
    without `clip` (the row-sparse table optimiser clips over all gradients itself) no
    clipping."""
    schedule = learning_rate_schedule(config)
    adam = dict(b1=config.b1, b2=config.b2, eps=ADAM_EPS)
    transforms = {
        BACKBONE: optax.adamw(schedule, weight_decay=config.weight_decay, **adam),
        NO_DECAY: optax.adam(schedule, **adam),
        ENGRAM_TABLE: optax.adam(table_learning_rate_schedule(config), **adam),
    }
    clipping = (optax.clip_by_global_norm(config.clip_norm) if clip and config.clip_norm
                else optax.identity())
    return optax.chain(clipping, optax.multi_transform(transforms, param_labels))
