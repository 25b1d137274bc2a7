"""Test set-up: 8 fake CPU devices (before JAX starts) and a small real CIFAR-10 slice."""
import os
import pathlib
import tarfile

# XLA's CPU backend spends most of a test's time in LLVM optimisation (a tiny ResNet's init
# takes ~40 s to compile at the default level, ~4 s at level 0); tests run tiny models, so
# compile speed matters more than kernel speed. Subprocesses inherit this.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

CIFAR_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10"


def _extract_slice(archive, dest, per_class):
  """Copy the first `per_class` images of each class out of a read-only archive."""
  counts = {}
  with tarfile.open(archive) as tar:
    for member in tar:
      if not member.isfile():
        continue
      parts = pathlib.PurePosixPath(member.name).parts  # split/class/file
      label = parts[-2]
      if counts.get(label, 0) >= per_class:
        continue
      counts[label] = counts.get(label, 0) + 1
      target = dest.joinpath(*parts)
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(tar.extractfile(member).read())


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
  """A class-folder tree root/{train,test}/<class>/*.jpg: 20 train and 10 test images a class."""
  if not CIFAR_DIR.exists():
    pytest.skip(f"shared CIFAR-10 archives not found at {CIFAR_DIR}")
  root = tmp_path_factory.mktemp("cifar10")
  _extract_slice(CIFAR_DIR / "cifar10_jpg_train.tar.gz", root, 20)
  _extract_slice(CIFAR_DIR / "cifar10_jpg_test.tar.gz", root, 10)
  return root
