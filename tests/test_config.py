"""Configuration: includes, overrides, one-line errors (exit code 2 through train.py), batch layout."""

import subprocess
import sys
from pathlib import Path

import pytest

from fdistill.config import batch_layout, dump_config
from fdistill.errors import ConfigError
from fdistill.recipes import load_config

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs" / "ring_tiny.yaml")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_include_chain_then_file_then_overrides(tmp_path):
    _write(tmp_path / "base.yaml", "train: {steps: 7, batch_size: 32}\nmodel: {hidden: 16}\n")
    _write(tmp_path / "mid.yaml", "include: base.yaml\ntrain: {steps: 9}\n")
    top = _write(tmp_path / "top.yaml", "include: [mid.yaml]\nmodel: {depth: 5}\n")
    cfg, _ = load_config(top, ["train.batch_size=16"])
    assert (cfg.train.steps, cfg.train.batch_size, cfg.model.hidden, cfg.model.depth) == (9, 16, 16, 5)
    assert cfg.run.dir == str(Path("runs") / "top")


def test_yaml_no_is_the_word_for_a_string_key(tmp_path):
    """YAML reads ``no`` as false; ``train.mixed_precision`` takes it as accelerate's word, from a file or the CLI."""
    top = _write(tmp_path / "top.yaml", "include: " + TINY + "\ntrain: {mixed_precision: no}\n")
    assert load_config(top)[0].train.mixed_precision == "no"
    cfg, _ = load_config(TINY, ["train.mixed_precision=bf16", "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"
    cfg, _ = load_config(TINY, ["log.tensorboard=no"])  # a boolean key still reads the word as false
    assert cfg.log.tensorboard is False


def test_tiny_config_resolves_its_base_and_new_sections():
    cfg, options = load_config(TINY, ["ema.averages=[{name: slow, half_life_kimg: 0.5}]", "eval.ema=slow"])
    assert cfg.teacher.num_modes == 8 and options.name == "f_distill"  # from ring_base.yaml and the file
    assert [e.name for e in cfg.ema.averages] == ["slow"] and cfg.ema.averages[0].rampup == 0.05
    assert "checkpoint:" in dump_config(cfg) and "mixed_precision: 'no'" in dump_config(cfg)


@pytest.mark.parametrize("overrides, message", [
    (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["train.steps=abc"], "bad value for config key 'train.steps'"),
    (["ema.averages=[{name: a, decy: 0.9}]"], "did you mean 'ema.averages[0].decay'"),
    (["ema.averages=[{name: a, decay: 0.9, sigma_rel: 0.1}]"], "needs exactly one of"),
    (["ema.averages=[{name: a, decay: 0.9}, {name: a, decay: 0.8}]"], "used twice"),
    (["eval.ema=nope"], "eval.ema='nope' names no ema.averages entry"),
    (["train.mixed_precision=fp32"], "choose one of no, bf16, fp16"),
    (["ema.update=sometimes"], "bad value for config key 'ema.update'"),
    (["critic_optim.lr_decay=exponential"], "lr_decay='exponential' is unknown; use one of constant, cosine, linear"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_include_errors(tmp_path):
    missing = _write(tmp_path / "a.yaml", "include: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="included file not found"):
        load_config(missing)
    _write(tmp_path / "b.yaml", "include: c.yaml\n")
    cyclic = _write(tmp_path / "c.yaml", "include: b.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(cyclic)


@pytest.mark.parametrize("batch, device, processes, expected", [
    (64, None, 1, (64, 1)), (64, None, 2, (32, 1)), (64, 32, 1, (32, 2)), (64, 8, 2, (8, 4)),
])
def test_batch_layout(batch, device, processes, expected):
    cfg, _ = load_config(TINY, [f"train.batch_size={batch}", f"train.device_batch_size={device or 'null'}"])
    assert batch_layout(cfg.train, processes) == expected


def test_batch_layout_rejects_uneven_splits():
    cfg, _ = load_config(TINY, ["train.batch_size=64", "train.device_batch_size=24"])
    with pytest.raises(ConfigError, match="not a multiple of 1 processes x train.device_batch_size=24"):
        batch_layout(cfg.train, 1)


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--config", TINY, "train.stepz=3"],
     "error: unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    (["--config", TINY, "train.steps=abc"], "error: bad value for config key 'train.steps'"),
    (["--config", "BAD_INCLUDE"], "error: "),
])
def test_train_py_config_errors_exit_2_with_one_line(tmp_path, args, message):
    if args[1] == "BAD_INCLUDE":
        args = ["--config", _write(tmp_path / "x.yaml", "include: missing_base.yaml\n")]
        message = f"error: {tmp_path / 'x.yaml'}: included file not found: {tmp_path / 'missing_base.yaml'}"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
