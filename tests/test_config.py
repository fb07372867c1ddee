import pytest

from slm.config import builtin_configs, load_config
from slm.errors import ConfigError


def test_builtin_configs_load():
    assert {"tiny", "seed30m", "gpt_124m", "gpt_350m"} <= set(builtin_configs())
    for name in builtin_configs():
        load_config(name)
    seed = load_config("seed30m").model
    assert (seed.n_layers, seed.n_heads, seed.d_model, seed.context_length, seed.vocab_size) == (6, 6, 384, 128, 50257)


def test_numbers_as_strings_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  learning_rate: 1e-4\n  max_steps: '2e3'\nmodel:\n  d_model: 64\n  n_heads: 4\n")
    cfg = load_config(path, ["training.batch_size=4", "training.lr=3e-4", "training.compile=false"])
    assert cfg.training.lr == 3e-4 and cfg.training.max_steps == 2000 and cfg.training.batch_size == 4
    assert cfg.training.compile is False and cfg.model.d_model == 64


@pytest.mark.parametrize("yaml_text, message", [
    ("training:\n  lerning_rate: 1e-3\n", r"^training\.lerning_rate: unknown key; did you mean 'learning_rate'\?"),
    ("training:\n  batch_size: many\n", r"^training\.batch_size: expected an integer, got 'many'"),
    ("training:\n  lr: fast\n", r"^training\.lr: expected a number"),
    ("training:\n  lr: -1\n", r"^training\.lr: expected a positive number"),
    ("training:\n  dtype: float8\n", r"^training\.dtype: expected one of"),
    ("model:\n  n_heads: 5\n", r"^model\.n_heads: 5 heads do not divide d_model=768"),
    ("model:\n  d_model: 0\n", r"^model\.d_model: expected a positive integer"),
    ("data:\n  val_fraction: 2\n", r"^data\.val_fraction: expected a number in \[0, 1\)"),
    ("modle:\n  d_model: 3\n", r"^modle: unknown key; did you mean 'model'\?"),
    ("training: 3\n", r"^training: expected a mapping"),
    ("training:\n  warmup_steps: 50\n  max_steps: 10\n", r"^training\.warmup_steps"),
    ("training:\n  compile_mode: fast\n", r"^training\.compile_mode: expected one of default, reduce-overhead"),
    ("training:\n  attention: flash3\n", r"^training\.attention: expected one of auto, sdpa, flash, cudnn"),
    ("training:\n  loss_chunk: -1\n", r"^training\.loss_chunk: expected 0 \(off\)"),
    ("training:\n  prefetch: -2\n", r"^training\.prefetch: expected 0 \(off\)"),
    ("logging:\n  peak_tflops: -5\n", r"^logging\.peak_tflops: expected a number >= 0"),
])
def test_config_errors_name_the_key(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_lists_builtins():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no_such_config")


def test_bad_override():
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config("tiny", ["training.lr"])
