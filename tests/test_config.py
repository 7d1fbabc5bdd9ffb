import argparse

import pytest

from recycore.cli import add_config_flags, config_from
from recycore.config import Config


def test_defaults_are_the_seeds():
    cfg = Config()
    assert (cfg.num_layers, cfg.model_dim, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (12, 512, 8, 4, 1024)
    assert (cfg.head_dim, cfg.kv_dim, cfg.mlp_dim) == (64, 256, 1536)
    assert cfg.recycle_layers == (3, 4) and cfg.ve_layers == (10, 11) and cfg.xsa_layers == (8, 9, 10, 11)
    assert (cfg.train_batch_tokens, cfg.train_seq_len, cfg.max_wallclock_seconds) == (786_432, 2048, 600.0)


def test_env_then_flags_override():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--num-layers", "8", "--ve-layers", "6,7", "--ln-scale", "0"])
    env = {"NUM_LAYERS": "10", "MODEL_DIM": "256", "RECYCLE_LAYERS": "1,2", "VE_LAYERS": "8,9"}
    cfg = config_from(args, environ=env, matrix_lr=0.5)
    assert cfg.num_layers == 8  # flag beats env
    assert cfg.model_dim == 256 and cfg.recycle_layers == (1, 2)  # env beats default
    assert cfg.ve_layers == (6, 7) and cfg.ln_scale is False
    assert cfg.matrix_lr == 0.5  # preset under env and flags
    assert Config.from_env({"TRAIN_BATCH_TOKENS": "786_432", "LN_SCALE": "true"}).ln_scale is True


@pytest.mark.parametrize("changes, field", [
    ({"num_heads": 7}, "num_heads"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"model_dim": 24, "num_heads": 8}, "model_dim"),  # head_dim 3 is odd
    ({"recycle_layers": (12,)}, "recycle_layers"),
    ({"ve_layers": (-1,)}, "ve_layers"),
    ({"model_dim": 0}, "model_dim"),
    ({"train_seq_len": -5}, "train_seq_len"),
    ({"kernels": "cuda"}, "kernels"),
])
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"invalid config: {field}="):
        Config(**changes)


def test_bad_env_value_is_a_clear_error():
    with pytest.raises(ValueError, match="NUM_LAYERS"):
        Config.from_env({"NUM_LAYERS": "twelve"})


def test_dict_round_trip():
    cfg = Config(num_layers=6, ve_layers=(4, 5), recycle_layers=(2,))
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config fields: bogus"):
        Config.from_dict({**cfg.to_dict(), "bogus": 1})
