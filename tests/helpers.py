"""Shared test helpers: load a config file the way the command line does."""
import importlib.util
import pathlib

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name, arg=None):
  """configs/<name>.py:get_config(arg), unlocked so tests can reshape it."""
  spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  return config
