"""Which dense slot a request takes: the longest cached prefix, else the least recently used."""
from trustee_jax.sampling.slots import Slot, common_prefix, pick_dense_slot


def test_common_prefix_counts_the_shared_leading_tokens():
  assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
  assert common_prefix([1, 2], [1, 2, 3]) == 2
  assert common_prefix([], [1]) == 0
  assert common_prefix([7], [1]) == 0


def test_the_slot_holding_the_conversation_is_reused_but_its_last_prompt_token_is_fed():
  slots = [Slot([9, 9], last_used=5), Slot([1, 2, 3], last_used=1), Slot([1], last_used=9)]
  assert pick_dense_slot(slots, [0, 1, 2], [1, 2, 3, 4]) == (1, 3)
  assert pick_dense_slot(slots, [0, 1, 2], [1, 2, 3]) == (1, 2)  # the whole prompt is cached


def test_without_a_shared_prefix_the_least_recently_used_free_slot_is_taken():
  slots = [Slot([9], last_used=5), Slot([8], last_used=2), Slot([7], last_used=1)]
  assert pick_dense_slot(slots, [0, 1], [1, 2]) == (1, 0)  # slot 2 is not free


def test_equal_prefixes_go_to_the_least_recently_used_slot():
  slots = [Slot([1, 2], last_used=4), Slot([1, 2], last_used=3)]
  assert pick_dense_slot(slots, [0, 1], [1, 2, 5]) == (1, 2)
