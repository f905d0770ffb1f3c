"""The plan of a ClassifyBatch: its prompts with duplicate policies collapsed, and each limit refused with the
limit, the count and what to do, before any work starts."""

from __future__ import annotations

import pytest

from classification.content import Text
from server.batch_plan import BATCH_ITEMS, BATCH_POLICIES, BATCH_PROMPTS, ITEM_POLICIES, BatchRefused, plan_batch
from server.errors import InvalidArgument
from server.jobs import Selector
from server.limits import Limits

LIMITS = Limits(max_content_tokens=100, max_policy_tokens=100, max_batch_items=10, max_batch_prompts=12,
                max_batch_policies=4, max_item_policies=3)
A, B, C, D, E = (Selector(ref=name) for name in "abcde")


def items(count: int, selectors: list[Selector]) -> list:
    return [(str(i), Text(f"text {i}"), selectors) for i in range(count)]


def test_duplicate_policies_collapse_per_item_and_items_keep_their_ids():
    inline = Selector(inline_text="+++\nid='x'\n+++\nbody")
    plan = plan_batch([("one", Text("same"), [A, B, A, inline, inline]), ("two", Text("same"), [B, B])], LIMITS)
    assert [(p.item_id, p.selector) for p in plan.prompts] == [("one", A), ("one", B), ("one", inline),
                                                               ("two", B)]
    assert plan.policies == 3 and plan.work == 4


def test_an_item_without_a_policy_is_one_answer_and_no_work():
    plan = plan_batch([("lonely", Text("x"), []), ("ok", Text("y"), [A])], LIMITS)
    assert [(p.item_id, p.selector) for p in plan.prompts] == [("lonely", None), ("ok", A)]
    assert plan.work == 1


def test_bad_content_still_plans_its_prompts():
    bad = InvalidArgument("content.conversation has no turns")
    plan = plan_batch([("bad", bad, [A, B])], LIMITS)
    assert [p.content for p in plan.prompts] == [bad, bad]


@pytest.mark.parametrize(("batch", "reason", "message"), [
    ([], BATCH_ITEMS, "the batch has no items"),
    (items(11, [A]), BATCH_ITEMS, "the batch has 11 items; at most 10 are accepted per ClassifyBatch (send several"),
    ([("big", Text("x"), [A, B, C, D, A])], ITEM_POLICIES,
     "item 'big' names 4 distinct policies; at most 3 are accepted per item (classify it in several batches"),
    ([("1", Text("x"), [A, B, C]), ("2", Text("y"), [D, E])], BATCH_POLICIES,
     "the batch names 5 distinct policies; at most 4 are accepted per ClassifyBatch (split it into batches by "
     "policy)"),
    (items(5, [A, B, C]), BATCH_PROMPTS,
     "the batch asks for 15 prompts (each item once per distinct policy); at most 12 are accepted per ClassifyBatch "
     "(split it into several smaller batches)"),
])
def test_limits_are_refused_with_the_numbers(batch, reason, message):
    with pytest.raises(BatchRefused) as refused:
        plan_batch(batch, LIMITS)
    assert refused.value.code == "INVALID_ARGUMENT" and refused.value.reason == reason
    assert message in refused.value.message


def test_duplicates_do_not_count_against_the_limits():
    plan = plan_batch(items(4, [A, B, C, A, B, C]), LIMITS)  # 4 x 3 distinct: exactly the prompt limit
    assert len(plan.prompts) == 12
