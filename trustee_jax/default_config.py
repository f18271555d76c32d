"""The full default run config; configs/*.py start from it and change what differs.

This is the one source of defaults: the dataclasses built from its blocks (rollout, grpo,
curriculum, world.*; through config_dataclass.from_config, which rejects unknown keys) default
to the same values (tests/test_config.py checks every field set here)."""
import ml_collections
from ml_collections.config_dict import placeholder


def role_sampling(max_tokens: int, temperature: float | None = None) -> dict:
  """The sampling fields that the world.task/user/tools/judge blocks share (those that
  simulator/tasks.py's sampling_kwargs passes to the simulator). An unset field
  (None) leaves that setting to the simulator server; each is a typed placeholder, so that it
  can still be set on the command line (--config.world.user.temperature=0.7)."""
  return dict(max_tokens=max_tokens,
              temperature=placeholder(float) if temperature is None else temperature,
              top_p=placeholder(float), top_k=placeholder(int),
              frequency_penalty=placeholder(float),
              chat_template_kwargs=placeholder(dict))


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress_bar = True
  c.rollout_concurrency = 0  # episodes in flight (0: all)

  # (data, fsdp, tensor) sizes over all processes' devices, -1 for "the rest"; () = one device.
  # rules: overrides of sharding.LOGICAL_RULES, logical name -> mesh axis, tuple of them or None
  # (replicated), e.g. {"mlp": None}; empty = LOGICAL_RULES (sharding.rules_from_config).
  c.mesh = ml_collections.ConfigDict(dict(shape=(), rules={}))
  # Several processes (distributed.py): mode env ($JAX_COORDINATOR_ADDRESS, ... or the fields
  # below; none set = one process) or auto (Cloud TPU, SLURM, ...). -1 / "": unset.
  c.distributed = ml_collections.ConfigDict(dict(
      mode="env", coordinator_address="", num_processes=-1, process_id=-1, timeout_s=300))
  # The machine a config is written for (configs/qwen3_8b.py names it). platform gpu | tpu: the
  # trainer refuses any other JAX backend (runtime.check_backend), CPU only with allow_cpu.
  c.hardware = ml_collections.ConfigDict(dict(name="", platform="", allow_cpu=False))
  c.model = ml_collections.ConfigDict(dict(
      name="smollm2", tokenizer="smollm2", dtype="float32", param_dtype="float32",
      remat_policy="full",  # recompute each layer in the backward: activations of one layer
      attention_impl="einsum"))  # einsum | xla | cudnn | splash | auto (models/attention.py)
  # unstack_layers: decode reads a per-layer copy of the weights (faster, one more copy).
  # kv_layout: dense (a cache_len row per slot) | paged (one pool of block_size-token blocks,
  # num_blocks of them, 0: the dense cache's memory; shared prompt prefixes are computed once).
  # backend: jax (the in-process engine above) | sglang (the policy served by the SGLang server at
  # sglang_url; each update's weights written to weights_dir, storage the server reads, and
  # pushed: sampling/sglang_backend.py; needs train.recompute_old_logprobs=True).
  c.engine = ml_collections.ConfigDict(dict(num_slots=16, cache_len=2048, decode_chunk=8,
                                            unstack_layers=True, kv_layout="dense",
                                            block_size=16, num_blocks=0, backend="jax",
                                            sglang_url="", weights_dir=""))

  # The frozen LM world. mode: embedded (a server this run starts) | url (SGLang) | doubles.
  # backend (embedded only): jax (python -m trustee_jax.serving) | llamacpp (`processes`
  # 1-thread servers). doubles_judge (doubles only): rule (the home world's checked judge) |
  # coin (a hash of the policy's words: variance without meaning, for mechanics tests).
  c.simulator = ml_collections.ConfigDict(dict(
      mode="embedded", backend="jax", processes=1, dtype="", doubles_judge="rule",
      urls=(), api_key="", model="smollm2", tokenizer="", port=0,  # 0: any free port
      num_slots=16, cache_len=4096, timeout_s=120.0, max_retries=3, max_concurrency=16,
      startup_timeout_s=600.0, log_dir=".",
      json_mode="constrained"))  # or "prompted": the reference's (simulator/client.py)
  c.world = ml_collections.ConfigDict()
  c.world.tool_pool = ""  # "" = the shipped pool; or a path (TRUSTEE's toolbench_tools.json)
  c.world.lenient_pool = False
  # task_source "rule": an LM world plays the rule-checked home family's tasks (tools from its
  # pool), which carry an oracle; oracle "rule" scores every episode by it beside the judge
  # (logged under oracle/ and val/oracle_, never trained on): does the judge track success?
  c.world.task_source = "lm"  # lm | rule
  c.world.oracle = ""  # "" | rule
  c.world.task = ml_collections.ConfigDict(dict(
      hidden_facts=True, initial_state=True, expected_arguments=True, max_attempts=3,
      thinking_prompt=False,
      **role_sampling(max_tokens=1024, temperature=1.0)))
  # A short batch of tasks is refilled at an easier level; an outage is waited out (world.py).
  c.world.task_refill = ml_collections.ConfigDict(dict(
      rounds=5, oversample=2, level_drop=10, outage_wait_s=300.0, max_sleep_s=30.0))
  # extra_fields: the user's private thought, the tools' notes, the judge's per-criterion
  # verdicts, asked for before the answer (the reference asks for none of them).
  c.world.user = ml_collections.ConfigDict(dict(extra_fields=True,
                                                **role_sampling(max_tokens=384)))
  c.world.tools = ml_collections.ConfigDict(dict(
      schema_check=True, use_ledger=True, max_result_chars=512, max_parallel_calls=3,
      extra_fields=True, **role_sampling(max_tokens=512)))
  c.world.judge = ml_collections.ConfigDict(dict(
      num_votes=1, max_criteria=5, mode="lm",  # lm | rule | blend | questions
      extra_fields=True, **role_sampling(max_tokens=512)))

  c.curriculum = ml_collections.ConfigDict(dict(mode="level"))
  c.grpo = ml_collections.ConfigDict(dict(
      single_survivor="zero", turn_mode="uniform", clip_low=0.2, clip_high=0.2, dual_clip_c=3.0,
      kl_beta=0.001, kl_type="low_var_kl", agg="token-mean"))
  c.rollout = ml_collections.ConfigDict(dict(
      group_size=8, max_turn_tokens=512, max_episode_tokens=4096, temperature=1.0, top_p=1.0,
      top_k=0, enable_thinking=False, max_parallel_calls=3, invalid_call_penalty=0.0,
      accept_untagged_calls=False, show_reasoning=False, turn_limits="project",
      ablate=()))  # ablate: rollout.ABLATIONS, configs/ablations.py

  c.train = ml_collections.ConfigDict(dict(
      steps=200, tasks_per_step=16, updates_per_step=4, micro_batch=4,
      length_buckets=(256, 512, 1024, 2048, 4096, 8192, 16384, 24576),
      recompute_old_logprobs=False, logprob_chunk=8192,
      # prefetch_tasks: the next step's tasks are generated while this step's update runs
      # (from the curriculum state the update does not change); the same tasks either way.
      prefetch_tasks=True,
      control=""))  # negative controls of the learning benchmark: negate_advantages | permute_rewards
  c.train.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-6, schedule="constant", warmup_steps=0, total_updates=800,
      weight_decay=0.01, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8))
  # Fixed simulated tasks, run every `every` steps (0: off) with validation sampling settings;
  # level 0 draws them at the curriculum's starting level, another value at that fixed level.
  # file: a fixed set in the reference's valid.parquet fields (JSON, JSON Lines or Parquet,
  # simulator/validation_file.py) instead of generated tasks; num_tasks and level then unused.
  # seed: draws the tasks and their sampling (-1: the run's seed); fixed, runs of every seed
  # are scored on one held-out set.
  c.validation = ml_collections.ConfigDict(dict(every=10, num_tasks=16, samples=4,
                                                temperature=0.6, top_p=0.95, top_k=20, level=0,
                                                file="", seed=-1))
  # async_save: the files are written in the background while the next step's rollouts run.
  c.checkpoint = ml_collections.ConfigDict(dict(every=10, keep=3, async_save=True))
  # A resume refuses a config that differs from the checkpoint's beyond checkpoint.py's
  # RESUMABLE_CHANGES (steps, logging, cadences, endpoints); these patterns allow more.
  c.resume = ml_collections.ConfigDict(dict(allow_changes=()))
  c.log = ml_collections.ConfigDict(dict(episodes_every=1, episodes_per_log=8))
  return c
