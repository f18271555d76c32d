"""The checks of a generated task that a schema cannot make (tests/test_tasks.py checks them on
generated replies against their schemas)."""
from trustee_jax.simulator import task_checks as tc


def test_mentions_tool():
  assert tc.mentions_tool("Can you run add_to_cart?", "add_to_cart")
  assert tc.mentions_tool("try getPetById please", "getPetById")
  assert not tc.mentions_tool("add to cart please", "add_to_cart")
  assert not tc.mentions_tool("search for flights", "search")  # plain words are language
  assert not tc.mentions_tool("send sms to mom", "SEND SMS")
  assert not tc.mentions_tool("readd_to_cart", "add_to_cart")


def test_normalise_query_keeps_letters_and_digits_lower_case():
  assert tc.normalise_query("Set the Fan to  speed 3, please!") == "set the fan to speed 3 please"


def test_placeholders_are_found():
  found = {m.group(0) for m in tc.PLACEHOLDER.finditer("Order XXX for {name} on <date> at [place]")}
  assert found == {"XXX", "{name}", "<date>", "[place]"}
  assert not tc.PLACEHOLDER.search("Order 2 kettles for Ana on 12 May")
