"""The import layers of trustee_jax (`[tool.importlinter]` in pyproject.toml), checked by
import-linter on this checkout's sources: a module imports only from layers below its own."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# lint-imports without its cache directory; cwd first on sys.path: this checkout is the one read.
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")


def test_layers_contract_is_kept():
  out = subprocess.run([sys.executable, "-c", LINT], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  report = out.stdout + out.stderr
  assert "No module named 'importlinter'" not in report, (
      "import-linter is not installed: pip install -r requirements-test.txt")
  assert out.returncode == 0, report
