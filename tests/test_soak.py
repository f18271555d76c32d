"""A short soak of the simulator server (benchmarks/soak.py): 16 clients for 20 s after a
20 s warm-up, a tiny random model in a child process; no valid request may fail."""
import pytest

from benchmarks import soak


@pytest.mark.heavy
@pytest.mark.slow
def test_a_short_soak_serves_every_valid_request_and_frees_its_slots():
  result = soak.run_soak(duration_s=20, concurrency=16, warmup_s=20)
  assert result["failures"] == [], result
  assert result["valid_errors"] == 0 and result["valid_served"] >= 10, result
  assert set(result["served"]) >= {"chat", "stream", "malformed"}, result["served"]
  assert result["malformed_status"] and all(
      400 <= int(code) < 500 for code in result["malformed_status"]), result["malformed_status"]
  assert result["busy_slots_after"] == 0 and result["pending_after"] == 0
  assert result["server_exit_code"] == 0 and result["server_stopped_msg"]
  assert result["rss_growth_after_warmup_mb"] < 512, result  # generous: compiles still add some
