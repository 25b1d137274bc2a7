"""Shared test helpers: load a config file the way the command line does."""
import pathlib

from sce_jax import config as sce_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=None):
  """configs/<name>.py:get_config(arg) through `config.load`, unlocked so tests can reshape it."""
  config = sce_config.load(f"{CONFIGS / name}.py" + (f":{arg}" if arg else ""))
  config.unlock()
  return config
