"""What the command lines (`main.py`, `aot.py`) share: the --config flag and its parsing.

--config=FILE[:VARIANTS] reads a config file (ml_collections' config_flags), and
--config.KEY=VALUE overrides one of its values; --config.method=NAME reads the file with that
method's recipe (its `method` variant), then applies the overrides.
"""
import sys

import flax.traverse_util
from absl import flags
from ml_collections import config_flags

from sce_jax import config as sce_config
from sce_jax import schema

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/cifar10_r18.py:smoke; override its values with "
    "--config.KEY=VALUE (--config_help lists the keys).", lock_config=True)


class _ConfigHelp(flags.BooleanFlag):
  """--config_help prints the config keys (`schema.describe`) and exits as it is parsed, like
  absl's --help, so that no other flag is needed."""

  def __init__(self):
    super().__init__("config_help", False, "Print every config key (--config.KEY=VALUE) with "
                     "its default, meaning and allowed values, then exit.")

  def parse(self, argument):
    super().parse(argument)
    if self.value:
      print(schema.describe())
      sys.exit(0)


flags.DEFINE_flag(_ConfigHelp())


def _alias(argv, name):
  """'Did you mean ...' for an unknown key `name` of a --config.KEY=VALUE override that
  schema.ALIASES knows by another name ('sce.temperature' -> 'sce.temp'), else ''."""
  keys = flax.traverse_util.flatten_dict(sce_config.base().to_dict(), sep=".")
  name = str(name).strip("'\"")  # ml_collections quotes it
  for arg in argv:
    path = arg.removeprefix("--config.").partition("=")[0]
    section, _, last = path.rpartition(".")
    if arg.startswith("--config.") and last == name and name in schema.ALIASES:
      known = ".".join(filter(None, (section, schema.ALIASES[name])))
      if known in keys:
        return f'Did you mean "{known}"? ({name} is called {schema.ALIASES[name]} here)\n'
  return ""


def parse_flags(argv):
  """absl's flag parsing; a bad config key or variant is reported by its message alone.

  ml_collections raises these as they come (an unknown key of the locked ConfigDict) or
  re-raised with a traceback as their text (errors in a config file); the original is in the
  exception's context chain.
  """
  try:
    argv = flags.FLAGS(argv)
    flag = flags.FLAGS["config"]
    if flag.present:  # ml_collections reports a missing file only when read.
      spec = config_flags.get_config_filename(flag)
      sce_config.check_file(spec.partition(":")[0])
      overrides = config_flags.get_override_values(flag)
      if "method" in overrides:  # the file again, with that method's recipe under the overrides
        flag.value = sce_config.load(spec, method=overrides["method"])
        flag.value.update_from_flattened_dict(overrides)
    return argv
  except Exception as e:  # pylint: disable=broad-except
    chain = [e]
    while chain[-1].__context__ is not None:
      chain.append(chain[-1].__context__)
    config_errors = [x for x in chain if isinstance(x, sce_config.ConfigError)]
    if config_errors:
      sys.exit(f"Config error: {config_errors[-1]}")
    key_errors = [x for x in chain if isinstance(x, (AttributeError, KeyError))]
    if key_errors:
      message = key_errors[0]
      while isinstance(message, BaseException) and message.args:
        message = message.args[0]
      sys.exit(f"Config error: no such key: {message}\n{_alias(argv, message)}Every key is "
               "declared in sce_jax/config.py (base()); fix the --config.KEY=VALUE override or "
               "the config file.")
    if isinstance(e, flags.Error):
      sys.exit(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help "
               "on flags.")
    raise
