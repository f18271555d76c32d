"""Runs BFCL generation and evaluation inside the bfcl-eval virtualenv (not imported by the project).

  <bfcl venv>/bin/python bfcl_runner.py --model NAME --categories a,b --project-root DIR
      --summary OUT.json [--limit N] [--local-model-path DIR] [--threads T] [--temperature X]
      [--max-tokens N]

The environment names the endpoint (LOCAL_SERVER_ENDPOINT/PORT and REMOTE_OPENAI_BASE_URL for
BFCL's local handlers, OPENAI_BASE_URL for its API handlers). Before BFCL runs, this script
  - registers `trustee-chat-FC`: BFCL's Qwen FC handler (Hermes <tool_call> parsing) that renders
    prompts with the chat template of --local-model-path, i.e. exactly as the policy was trained;
  - caps every local handler's context at the served `max_model_len` (from GET /v1/models), since
    BFCL sizes max_tokens from config.json and a server with a shorter context would refuse;
  - with --max-tokens, caps each completion's max_tokens (BFCL asks for up to 4096);
  - with --limit, writes BFCL's id file with the first N cases of each category and runs those;
  - with --accept-untagged-calls, also reads calls written as bare or fenced JSON objects
    (`{"name": ..., "arguments": {...}}` without <tool_call> tags) where a reply has no tagged
    call: what a run with rollout.accept_untagged_calls=True trained the policy to write.
Then it writes the per-category accuracy of BFCL's own score files to --summary.
"""
import argparse
import json
import os
import pathlib
import sys
from types import SimpleNamespace

CUSTOM_MODEL = "trustee-chat-FC"


def parse_args(argv):
  p = argparse.ArgumentParser()
  p.add_argument("--model", required=True)
  p.add_argument("--categories", required=True)
  p.add_argument("--project-root", required=True)
  p.add_argument("--summary", required=True)
  p.add_argument("--limit", type=int, default=None)
  p.add_argument("--local-model-path", default=None)
  p.add_argument("--threads", type=int, default=8)
  p.add_argument("--temperature", type=float, default=0.001)
  p.add_argument("--max-tokens", type=int, default=None)
  p.add_argument("--accept-untagged-calls", action="store_true")
  return p.parse_args(argv)


def untagged_calls(text: str) -> list[dict]:
  """The untagged calls in `text` as BFCL's {"name", "arguments"} dicts, read by the project's
  own parser (trustee_jax.tool_calls, imported from this checkout: it needs only jsonschema)."""
  root = str(pathlib.Path(__file__).resolve().parents[2])
  if root not in sys.path:
    sys.path.insert(0, root)
  from trustee_jax import tool_calls
  return [{"name": c.name, "arguments": c.arguments} for c in tool_calls.untagged_calls(text)]


def register_handler(served_name: str, accept_untagged: bool = False) -> None:
  """Adds trustee-chat-FC to BFCL's model table (the one dict every module imported)."""
  from bfcl_eval.constants.enums import ModelStyle
  from bfcl_eval.constants.model_config import MODEL_CONFIG_MAPPING, ModelConfig
  from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
  from bfcl_eval.model_handler.local_inference.qwen_fc import QwenFCHandler
  from bfcl_eval.model_handler.utils import convert_to_tool

  def format_prompt(self, messages, function):
    """Prompts rendered by the model's own chat template with the tools in OpenAI form (as
    BFCL gives them to OpenAI FC models: JSON-schema types, '.' in names as '_')."""
    tools = convert_to_tool(function, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS) or None
    return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                              add_generation_prompt=True)

  # What @overrides.override marks (it cannot resolve bases of a class built in a function).
  format_prompt.__override__ = True
  methods = {"_format_prompt": format_prompt}
  if accept_untagged:
    def extract_tool_calls(text):
      """Hermes-tagged calls, else untagged ones (untagged_calls)."""
      return QwenFCHandler._extract_tool_calls(text) or untagged_calls(text)
    extract_tool_calls.__override__ = True
    methods["_extract_tool_calls"] = staticmethod(extract_tool_calls)
  handler = type("TrusteeChatFCHandler", (QwenFCHandler,), methods)

  MODEL_CONFIG_MAPPING[CUSTOM_MODEL] = ModelConfig(
      model_name=served_name, display_name="trustee-jax policy (FC)",
      url="https://github.com/", org="trustee-jax", license="apache-2.0",
      model_handler=handler, input_price=None, output_price=None,
      is_fc_model=True, underscore_to_dot=True)


def cap_context_at_served_length(max_tokens: int | None) -> None:
  """After BFCL reads config.json's context, lower it to what the server serves; with
  max_tokens, no completion asks for more (BFCL asks for up to 4096)."""
  import requests
  from bfcl_eval.model_handler.local_inference.base_oss_handler import OSSHandler
  original = OSSHandler.spin_up_local_server

  def spin_up(self, *args, **kwargs):
    original(self, *args, **kwargs)
    reply = requests.get(f"{self.base_url}/models", timeout=30,
                         headers={"Authorization": f"Bearer {self.api_key}"})
    served = [m.get("max_model_len") for m in reply.json().get("data", [])]
    served = [int(n) for n in served if n]
    if served and min(served) < self.max_context_length:
      print(f"trustee: context capped at the served {min(served)} tokens "
            f"(config.json says {self.max_context_length})", flush=True)
      self.max_context_length = min(served)
    if max_tokens:
      create = self.client.completions.create

      def capped(**kw):
        kw["max_tokens"] = min(kw.get("max_tokens") or max_tokens, max_tokens)
        return create(**kw)

      self.client.completions.create = capped

  OSSHandler.spin_up_local_server = spin_up


def write_id_file(categories: list[str], limit: int, path: pathlib.Path) -> dict[str, list]:
  from bfcl_eval.utils import load_dataset_entry
  ids = {c: [e["id"] for e in load_dataset_entry(c)][:limit] for c in categories}
  path.write_text(json.dumps(ids, indent=1))
  return ids


def collect_scores(score_dir: pathlib.Path, model: str) -> dict[str, dict]:
  """{category: {accuracy, correct_count, total_count}} from BFCL's *_score.json headers."""
  from bfcl_eval.constants.category_mapping import VERSION_PREFIX
  out = {}
  for path in sorted((score_dir / model.replace("/", "_")).rglob(f"{VERSION_PREFIX}_*_score.json")):
    category = path.name[len(VERSION_PREFIX) + 1:-len("_score.json")]
    with open(path) as f:
      header = json.loads(f.readline())
    out[category] = {k: header[k] for k in ("accuracy", "correct_count", "total_count")}
  return out


def main(argv) -> int:
  args = parse_args(argv)
  root = pathlib.Path(args.project_root).absolute()
  root.mkdir(parents=True, exist_ok=True)
  os.environ["BFCL_PROJECT_ROOT"] = str(root)  # read when bfcl_eval.constants is imported
  from importlib.metadata import version

  from bfcl_eval._llm_response_generation import main as generate
  from bfcl_eval.constants.eval_config import SCORE_PATH, TEST_IDS_TO_GENERATE_PATH
  from bfcl_eval.eval_checker.eval_runner import main as evaluate

  served = os.environ.get("TRUSTEE_SERVED_MODEL", args.model)
  register_handler(served, args.accept_untagged_calls)
  cap_context_at_served_length(args.max_tokens)
  categories = [c for c in args.categories.split(",") if c]
  ids = None
  if args.limit:
    ids = write_id_file(categories, args.limit, TEST_IDS_TO_GENERATE_PATH)
  generate(SimpleNamespace(
      model=[args.model], test_category=categories, temperature=args.temperature,
      include_input_log=False, exclude_state_log=False, num_gpus=1, num_threads=args.threads,
      gpu_memory_utilization=0.9, backend="sglang", skip_server_setup=True,
      local_model_path=args.local_model_path, result_dir=None, allow_overwrite=True,
      run_ids=bool(args.limit), enable_lora=False, max_lora_rank=None, lora_modules=None))
  evaluate([args.model], categories, None, None, partial_eval=bool(args.limit))
  scores = collect_scores(SCORE_PATH, args.model)
  missing = sorted(set(categories) - set(scores))
  summary = {"bfcl_eval_version": version("bfcl-eval"), "model": args.model,
             "categories": scores, "missing": missing,
             "case_ids": ids, "partial": bool(args.limit),
             "accept_untagged_calls": args.accept_untagged_calls}
  pathlib.Path(args.summary).write_text(json.dumps(summary, indent=2))
  print(f"trustee: wrote {args.summary}", flush=True)
  return 1 if missing else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
