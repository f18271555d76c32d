"""Checks launch/serve_sglang.sh against the installed SGLang, without a GPU.

Run it with the Python of an environment where `sglang.srt.server_args` imports (see
tests/test_sglang_flags.py, which builds one). It asks the script for the exact arguments it
would pass (`--print-args`), once bare and once with every optional flag switched on, and
parses them with SGLang's own argument parser (`ServerArgs.add_cli_args`, and
`prepare_server_args` as `sglang.launch_server` does): an unknown flag, an abbreviated one or
a value outside a flag's choices fails. With `--protocol FILE` it also validates chat requests
and replies (JSON: {"requests": [...], "replies": [...], "errors": [...]}) against SGLang's
pydantic models (ChatCompletionRequest, ChatCompletionResponse, ErrorResponse).

  python launch/check_sglang_flags.py [--script launch/serve_sglang.sh] [--protocol FILE]
                                      [-- EXTRA_SGLANG_ARGS...]
Prints a JSON report and exits 0 when everything parses, 1 (naming the problem) otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

_REPO = pathlib.Path(__file__).resolve().parent.parent
_SCENARIOS = {"bare": {}, "all_options": {"DP_SIZE": "2", "API_KEY": "sk-check",
                                          "YARN_FACTOR": "4"}}
_CLEARED = ("MODEL", "PORT", "MEM_FRACTION", "DP_SIZE", "API_KEY", "YARN_FACTOR")


class CheckError(Exception):
  """A flag or body that SGLang would not accept."""


def script_args(script: pathlib.Path, env: dict[str, str], extra: list[str]) -> list[str]:
  """The argument list the script passes to sglang.launch_server, from its --print-args mode."""
  full_env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
  full_env.update(env)
  out = subprocess.run(["bash", str(script), "--print-args", *extra], env=full_env,
                       capture_output=True, text=True, timeout=30, check=False)
  if out.returncode != 0:
    raise CheckError(f"{script} --print-args failed ({out.returncode}): {out.stderr.strip()}")
  return out.stdout.splitlines()


def sglang_parser() -> argparse.ArgumentParser:
  """SGLang's own command-line parser, built as sglang.srt.server_args.prepare_server_args does."""
  from sglang.srt.server_args import ServerArgs
  parser = argparse.ArgumentParser(prog="sglang serve")
  ServerArgs.add_cli_args(parser)
  return parser


def check_args(argv: list[str]) -> dict[str, Any]:
  """Parses argv with SGLang's parser; returns {dest: value} for the flags given."""
  from sglang.srt.server_args import prepare_server_args
  parser = sglang_parser()
  known = parser._option_string_actions  # pylint: disable=protected-access
  flags = [a.split("=", 1)[0] for a in argv if a.startswith("--")]
  for flag in flags:
    if flag not in known:  # argparse would also accept an abbreviation: refuse it here.
      raise CheckError(f"SGLang has no flag {flag}")
  stderr = io.StringIO()
  try:
    with contextlib.redirect_stderr(stderr):
      namespace = parser.parse_args(argv)
  except SystemExit as e:
    usage_and_error = stderr.getvalue().strip().splitlines() or ["(no message)"]
    raise CheckError(f"SGLang rejects {argv}: {usage_and_error[-1]}") from e
  server_args = prepare_server_args(argv)
  parsed = {}
  for flag in flags:
    dest = known[flag].dest
    value = getattr(namespace, dest)
    if getattr(server_args, dest) != value:
      raise CheckError(f"{flag}: parser gave {value!r}, ServerArgs holds "
                       f"{getattr(server_args, dest)!r}")
    parsed[dest] = value
  return parsed


def check_protocol(path: pathlib.Path) -> dict[str, int]:
  """Validates request, reply and error bodies against SGLang's OpenAI protocol models."""
  from sglang.srt.entrypoints.openai import protocol
  bodies = json.loads(path.read_text())
  models = {"requests": protocol.ChatCompletionRequest,
            "replies": protocol.ChatCompletionResponse, "errors": protocol.ErrorResponse}
  counts = {}
  for key, model in models.items():
    for i, body in enumerate(bodies.get(key, [])):
      try:
        model.model_validate(body)
      except Exception as e:  # pydantic.ValidationError, or a model validator's ValueError.
        raise CheckError(f"{key}[{i}] is not a valid {model.__name__}: {e}") from e
    counts[key] = len(bodies.get(key, []))
  return counts


def main(argv: list[str]) -> int:
  cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  cli.add_argument("--script", type=pathlib.Path, default=_REPO / "launch" / "serve_sglang.sh")
  cli.add_argument("--protocol", type=pathlib.Path, default=None)
  cli.add_argument("extra", nargs="*", help="extra SGLang arguments (after --)")
  opts = cli.parse_args(argv)
  import sglang  # pylint: disable=import-outside-toplevel
  report: dict[str, Any] = {"sglang": sglang.__version__, "script": str(opts.script)}
  try:
    for name, env in _SCENARIOS.items():
      args = script_args(opts.script, env, opts.extra)
      report[name] = {"argv": args, "parsed": check_args(args)}
    if opts.protocol is not None:
      report["protocol"] = check_protocol(opts.protocol)
  except CheckError as e:
    print(f"check_sglang_flags: {e}", file=sys.stderr)
    return 1
  print(json.dumps(report, indent=1, default=str))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
