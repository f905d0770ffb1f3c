"""What a ClassifyBatch will cost, worked out before any of it runs: the prompts it fans out to and the limits on them.

A batch item is classified once per distinct policy it names (its own, or the batch's shared ones), so its cost is
prompts (item × policy pairs), not items: 256 items against 16 policies are 4,096 generations. The plan collapses
duplicate selectors (the same ref or inline text named twice, per item and across the shared list) and refuses a
batch over any limit with INVALID_ARGUMENT naming the limit, the count and what to do: the same batch would be
refused again however late it came, so RESOURCE_EXHAUSTED would be the wrong answer. Items keep their ids even when
two carry the same content: each is answered under its own id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from classification.content import Content
from server.errors import InvalidArgument, ServiceError
from server.jobs import Selector
from server.limits import Limits

# Refusal reasons, as the safeguard_refusals_total metric names them.
BATCH_ITEMS, BATCH_PROMPTS, BATCH_POLICIES, ITEM_POLICIES = "batch_items", "batch_prompts", "batch_policies", \
    "item_policies"


class BatchRefused(InvalidArgument):
    """A batch over one of its limits; `reason` names which."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PlannedPrompt:
    """One unit of a batch's work: an item against one policy (`selector` None: the item named none)."""

    item_id: str
    content: Content | ServiceError
    selector: Selector | None


@dataclass(frozen=True)
class BatchPlan:
    prompts: tuple[PlannedPrompt, ...]
    policies: int  # distinct policies across the batch

    @property
    def work(self) -> int:
        """Prompts that will reach the model (an item without a policy is answered with an error at once)."""
        return sum(1 for p in self.prompts if p.selector is not None)


def plan_batch(items: Sequence[tuple[str, Content | ServiceError, Sequence[Selector]]], limits: Limits) -> BatchPlan:
    """The batch's prompts, duplicates collapsed; raise BatchRefused when it is over a limit."""
    if not items:
        raise BatchRefused(BATCH_ITEMS, "the batch has no items")
    if len(items) > limits.max_batch_items:
        raise BatchRefused(BATCH_ITEMS, f"the batch has {len(items):,} items; at most {limits.max_batch_items:,} are "
                                        "accepted per ClassifyBatch (send several batches)")
    prompts: list[PlannedPrompt] = []
    distinct: dict[Selector, None] = {}
    for item_id, content, selectors in items:
        own = list(dict.fromkeys(selectors))
        if len(own) > limits.max_item_policies:
            raise BatchRefused(ITEM_POLICIES, f"item {item_id!r} names {len(own):,} distinct policies; at most "
                                              f"{limits.max_item_policies:,} are accepted per item (classify it in "
                                              "several batches, a few policies each)")
        distinct.update(dict.fromkeys(own))
        prompts.extend(PlannedPrompt(item_id, content, s) for s in own or (None,))
    if len(distinct) > limits.max_batch_policies:
        raise BatchRefused(BATCH_POLICIES, f"the batch names {len(distinct):,} distinct policies; at most "
                                           f"{limits.max_batch_policies:,} are accepted per ClassifyBatch (split it "
                                           "into batches by policy)")
    if len(prompts) > limits.max_batch_prompts:
        raise BatchRefused(BATCH_PROMPTS, f"the batch asks for {len(prompts):,} prompts (each item once per distinct "
                                          f"policy); at most {limits.max_batch_prompts:,} are accepted per "
                                          "ClassifyBatch (split it into several smaller batches)")
    return BatchPlan(tuple(prompts), len(distinct))
