"""JAX's persistent compilation cache: a restarted run loads its compiled step instead of
compiling it again (minutes for a ResNet-50 on a TPU slice, benchmarks/RESULTS.md).

On by default, in `<data.cache_dir>/xla`, or config.compile_cache_dir (a local path or gs://;
'none' turns it off). The cache key is JAX's: the lowered program, the devices, the compile
options and the versions of jax and jaxlib. The step closes over the config's values only
(train.build), never over a path, a time or a process id, so the same config on the same
devices gives the same key in every process and at every restart (tests/test_main.py).
"""
import os

import jax

OFF = "none"


def directory(config):
  """The cache's directory of `config`, or None when it is off."""
  path = config.compile_cache_dir or f"{config.data.cache_dir.rstrip('/')}/xla"
  if path == OFF:
    return None
  return path if "://" in path else os.path.expanduser(path)


def enable(config):
  """Points JAX at the cache of `config`; before anything compiles (JAX opens it once)."""
  path = directory(config)
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)


class Watch:
  """Counts the persistent cache's hits and misses while open (JAX's monitoring events), to
  say whether a compile came from the cache: `hit` (some hit and no miss), `used` (the cache
  was asked at all; below jax_persistent_cache_min_compile_time_secs a compile is not
  cached)."""
  HIT, MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"

  def __enter__(self):
    self.hits = self.misses = 0
    jax.monitoring.register_event_listener(self._count)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_listener(self._count)

  def _count(self, event, **kwargs):
    del kwargs
    self.hits += event == self.HIT
    self.misses += event == self.MISS

  @property
  def used(self):
    return self.hits + self.misses > 0

  @property
  def hit(self):
    return self.hits > 0 and not self.misses
