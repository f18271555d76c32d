"""install.sh's modes, run against a stand-in `python` that records each pip call (nothing is
installed): the accelerator modes add their pins and change nothing else, keep-jax leaves the
installed JAX alone, and the plain and test modes run the same calls as before."""
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNTIME = "-m pip install --disable-pip-version-check -q -r requirements.txt"
# A stand-in python: records pip's arguments (and the contents of <(...) files they name);
# answers keep-jax's question about the installed JAX with an older Colab-like version.
FAKE_PYTHON = r"""#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then
  [[ "$2" == *importlib.metadata* ]] && printf 'jax==0.7.2\njaxlib==0.7.2\n'
  exit 0
fi
echo "$*" >> "$INSTALL_LOG"
prev=""
for a in "$@"; do
  if [[ ("$prev" == -r || "$prev" == -c) && "$a" == /dev/fd/* ]]; then
    sed "s|^|  $prev |" "$a" >> "$INSTALL_LOG"
  fi
  prev="$a"
done
"""


def install(tmp_path: pathlib.Path, *mode: str) -> subprocess.CompletedProcess:
  bin_dir, log = tmp_path / "bin", tmp_path / f"log{'_'.join(mode)}"
  bin_dir.mkdir(exist_ok=True)
  (bin_dir / "python").write_text(FAKE_PYTHON)
  (bin_dir / "python").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "INSTALL_LOG": str(log)}
  out = subprocess.run(["bash", str(ROOT / "install.sh"), *mode], env=env, capture_output=True,
                       text=True, timeout=60)
  out.calls = log.read_text().splitlines() if log.exists() else []
  return out


def test_plain_and_test_modes_are_unchanged(tmp_path):
  plain, test = install(tmp_path), install(tmp_path, "test")
  assert plain.returncode == test.returncode == 0, (plain.stderr, test.stderr)
  assert plain.calls[0] == RUNTIME and len(plain.calls) > 1
  assert test.calls == [plain.calls[0],
                        "-m pip install --disable-pip-version-check -q -r requirements-test.txt",
                        *plain.calls[1:]]


@pytest.mark.parametrize("mode,extra", [("gpu", "jax[cuda12]"), ("tpu", "jax[tpu]")])
def test_accelerator_modes_add_their_jax_pins_and_nothing_else(tmp_path, mode, extra):
  plain, accel = install(tmp_path), install(tmp_path, mode)
  assert accel.returncode == 0, accel.stderr
  assert accel.calls == [f"{RUNTIME} -r requirements-{mode}.txt", *plain.calls[1:]]
  jax_pin = re.search(r"^jax==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M).group(1)
  assert f"{extra}=={jax_pin}" in (ROOT / f"requirements-{mode}.txt").read_text().split()


def test_keep_jax_installs_the_rest_on_the_installed_jax(tmp_path):
  kept = install(tmp_path, "keep-jax")
  assert kept.returncode == 0, kept.stderr
  first = kept.calls[:kept.calls.index(install(tmp_path).calls[1])]
  requirements = [l.split()[1] for l in first if l.startswith("  -r ")]
  constraints = [l.split()[1] for l in first if l.startswith("  -c ")]
  assert "flax==0.12.8" in requirements
  assert not [r for r in requirements if re.match(r"jax(lib)?(\[.*\])?==", r)]
  assert constraints == ["jax==0.7.2", "jaxlib==0.7.2"]


def test_an_unknown_mode_is_refused(tmp_path):
  out = install(tmp_path, "cuda")
  assert out.returncode == 2 and "unknown mode 'cuda'" in out.stderr and not out.calls
