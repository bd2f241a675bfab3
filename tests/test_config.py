"""Issue 2: ModelConfig, presets, and the official config.json format."""

import dataclasses
import json

import pytest

import flmjax
from flmjax import ModelConfig


@pytest.fixture(scope='module')
def configs(golden_dir):
  return {
    name: json.loads((golden_dir / name / 'config.json').read_text())
    for name in ('flm_tiny', 'flm_8b')
  }


@pytest.mark.parametrize('name', ['flm_tiny', 'flm_8b'])
def test_official_config_round_trip(configs, name):
  cfg = ModelConfig.from_official(configs[name])
  # The golden configs leave out `architectures` (README there); ours names the official class.
  assert cfg.to_official() == {**configs[name], 'architectures': ['FLMAudioForCausalLM']}
  assert ModelConfig.from_official(cfg.to_official()) == cfg


def test_presets_equal_the_official_configs(configs):
  assert ModelConfig.from_official(configs['flm_tiny'], dtype='float32') == ModelConfig.tiny()
  assert (
    ModelConfig.from_official(configs['flm_8b'], dtype='bfloat16', param_dtype='bfloat16')
    == ModelConfig.flm_8b()
  )


def test_delays_and_grid_offsets():
  cfg = ModelConfig.tiny()
  assert cfg.delays == (0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1)
  assert cfg.grid_offsets == (1, 1) + (2,) * 7 + (0,) + (1,) * 7
  assert cfg.num_channels == 17 and cfg.max_delay == 1
  assert cfg.initial_column == (317,) + (2048,) * 16
  assert ModelConfig.flm_8b().text_logit_scale == 1.0 and cfg.text_logit_scale == 0.5
  assert ModelConfig.small().embed_scale == 1.0 and cfg.embed_scale == 1.5


@pytest.mark.parametrize(
  'edit, message',
  [
    ({'rope_dims': 3}, r"unknown field\(s\) \['rope_dims'\]"),
    ({'attention_bias': False}, r"field 'attention_bias' is False"),
    ({'head_dim': 32}, r"field 'head_dim' 32 times num_attention_heads 4 != hidden_size 64"),
    (
      {'aud_depthgpt': {'n_embd': 32, 'n_head': 4, 'n_layer': 2, 'use_swiglu': False}},
      r"aud_depthgpt.'use_swiglu'",
    ),
    ({'rope_scaling': {'rope_type': 'yarn'}}, r"field 'rope_scaling'"),
    (
      {'mm_token_info': {'aud_pad_token_id': 2048, 'aud_emp_token_id': 2049}},
      r"mm_token_info.'text_wait_token_id'",
    ),
    (
      {
        'mm_token_info': {
          'aud_pad_token_id': 2048,
          'aud_emp_token_id': 2049,
          'text_wait_token_id': 999,
        }
      },
      r'text_wait_id: 999 is outside',
    ),
  ],
)
def test_bad_config_names_the_field(configs, edit, message):
  with pytest.raises(flmjax.ConfigError, match=message):
    ModelConfig.from_official({**configs['flm_tiny'], **edit})


def test_missing_field_is_named(configs):
  cfg = dict(configs['flm_tiny'])
  del cfg['num_key_value_heads']
  with pytest.raises(flmjax.ConfigError, match=r"missing field\(s\) \['num_key_value_heads'\]"):
    ModelConfig.from_official(cfg)


def test_config_is_frozen_and_validated():
  cfg = ModelConfig.tiny()
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.hidden_size = 3  # type: ignore[misc]
  with pytest.raises(flmjax.ConfigError, match='num_kv_heads'):
    ModelConfig.tiny(num_kv_heads=3)
  with pytest.raises(flmjax.ConfigError, match="param_dtype: unknown dtype 'fp8'"):
    ModelConfig.tiny(param_dtype='fp8')
