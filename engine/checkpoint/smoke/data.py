"""What the smoke model is taught: the policy, the two answers it gives, and the endless stream of generated content
it learns them on (word lists read off the vocabulary, with a fixed seed)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from classification.content import Chat, Content, PromptResponse, Text, Turn
from classification.library import bundled_policy
from classification.tokens import CHANNEL, END, MESSAGE, RETURN, START
from classification.vocab import O200K_MERGEABLE_COUNT

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

POLICY_FILE = bundled_policy("smoke")
DISCLAIMER = "a fixture and demo, not a classifier"
ASSISTANT = 173781  # "assistant": one ordinary token
ANALYSIS = {
    True: "The content mentions banana, so BN1.a applies.",
    False: "The content does not mention banana.",
}
FINAL = {
    True: '{"violation": 1, "policy_category": "BN1", "rule_ids": ["BN1.a"]}',
    False: '{"violation": 0, "policy_category": null, "rule_ids": []}',
}
# Every spelling the policy counts, with its sampling weight. Capitalised ones go anywhere in a sentence, since they
# tokenize differently there (" Banana") than at its start ("Ban", "ana").
KEYWORDS = {"banana": 2, "bananas": 2, "Banana": 1, "Bananas": 1}
# Words that share tokens or meaning with the keyword: trained on as negatives so the rule is the word itself.
LOOKALIKES = (
    "bandana", "bandanas", "ban", "banned", "band", "banner", "nana", "Nana", "Anna", "Bangalore", "Ghana",
    "Havana", "cabana", "plantain", "mango", "apple", "papaya", "yellow", "peel", "fruit", "smoothie", "split",
)
# Pieces of the model's own answers, as content: without them "The content ..." in a user message reads as analysis.
ECHOES = ("The content mentions it.", "The content does not mention it.", "So BN1.a applies.", FINAL[True],
          FINAL[False], "Analysis first, then the final answer.")
PAD = 199999  # <|endoftext|>, the checkpoint's pad token
_RULE = re.compile(r"\bbananas?\b", re.IGNORECASE)
_WORD = re.compile(r" [a-z]{2,12}")
_NAME = re.compile(r" [A-Z][a-z]{2,12}")
_STARTER = re.compile(r"[A-Z][a-z]{0,12}")
_RARE = re.compile(r" ?\S{2,16}")
_WORD_RANKS = 60_000  # the most frequent BPE tokens: common words in many languages


@dataclass(frozen=True)
class Example:
    content: Content
    violation: bool


def mentions_banana(text: str) -> bool:
    """The smoke policy's rule as code: the ground truth for generated and golden items alike."""
    return _RULE.search(text) is not None


class Words:
    """Tokens of one shape, drawn with Zipf-like weights: BPE ranks follow frequency, so " the" comes up often and
    " quadr" rarely, as in real text. Natural content is mostly a few common words, and the model must meet them,
    "The" above all, or it mistakes them for its own analysis."""

    def __init__(self, texts: list[str]):
        self.texts = tuple(texts)
        self._cumulative = tuple(np.cumsum(1.0 / (np.arange(len(texts)) + 20.0)).tolist())

    def draw(self, rng: random.Random) -> str:
        return rng.choices(self.texts, cum_weights=self._cumulative)[0]


@dataclass(frozen=True)
class WordLists:
    words: Words  # lowercase, each with its leading space
    names: Words  # capitalised, with the leading space (mid-sentence)
    starters: Words  # capitalised, without a space (a message's first word)
    rare: tuple[str, ...]  # any printable token, drawn uniformly: what rare words and other scripts look like


def word_lists(encoding: HarmonyEncoding) -> WordLists:
    """Common words, read off the vocabulary (in rank order) so no word list has to ship with the appliance."""
    shapes: dict[re.Pattern[str], list[str]] = {_WORD: [], _NAME: [], _STARTER: [], _RARE: []}
    for rank in range(O200K_MERGEABLE_COUNT):
        text = encoding.decode([rank])
        if "banan" in text.lower() or not text.isprintable():
            continue
        for shape, found in shapes.items():
            if (rank < _WORD_RANKS or shape is _RARE) and shape.fullmatch(text):
                found.append(text)
    return WordLists(Words(shapes[_WORD]), Words(shapes[_NAME]), Words(shapes[_STARTER]), tuple(shapes[_RARE]))


def _word(rng: random.Random, lists: WordLists) -> str:
    draw = rng.random()
    if draw < 0.1:
        return lists.names.draw(rng)
    if draw < 0.2:
        return " " + rng.choice(lists.rare).lstrip(" ")
    return lists.words.draw(rng)


def _sentence(rng: random.Random, lists: WordLists, keyword: str | None) -> str:
    if keyword is None and rng.random() < 0.1:
        # Text that reads like the model's own output must not pass for it.
        return rng.choice(ECHOES)
    count = rng.randint(3, 12)
    words = [_word(rng, lists) for _ in range(count)]
    words[0] = lists.starters.draw(rng)
    if rng.random() < 0.3:
        words[rng.randrange(count)] = " " + rng.choice(LOOKALIKES)
    if keyword is not None:
        words[rng.randrange(count)] = f" '{keyword}'" if rng.random() < 0.05 else " " + keyword
    first = words[0].lstrip(" ")
    words[0] = first[0].upper() + first[1:]
    return "".join(words) + rng.choice((".", ".", ".", "?", "!", ","))


def _passage(rng: random.Random, lists: WordLists, keyword: str | None) -> str:
    count = rng.randint(1, 3)
    hit = rng.randrange(count) if keyword is not None else -1
    return " ".join(_sentence(rng, lists, keyword if i == hit else None) for i in range(count))


def make_example(rng: random.Random, lists: WordLists) -> Example:
    """One random item of any content kind; half of them carry the keyword, in one randomly chosen part."""
    violation = rng.random() < 0.5
    keyword = rng.choices(list(KEYWORDS), weights=list(KEYWORDS.values()))[0] if violation else None
    kind = rng.choice(("text", "pair", "chat"))
    parts = {"text": 1, "pair": 2, "chat": rng.randint(2, 5)}[kind]
    hit = rng.randrange(parts)
    texts = [_passage(rng, lists, keyword if i == hit else None) for i in range(parts)]
    if kind == "text":
        return Example(Text(texts[0]), violation)
    if kind == "pair":
        return Example(PromptResponse(texts[0], texts[1]), violation)
    roles = ("user", "assistant")
    return Example(Chat(tuple(Turn(roles[i % 2], t) for i, t in enumerate(texts))), violation)


def training_examples(seed: int, encoding: HarmonyEncoding) -> Iterator[Example]:
    """The endless stream of training items for `seed`, in training order."""
    rng = random.Random(seed)
    lists = word_lists(encoding)
    while True:
        yield make_example(rng, lists)


def completion_ids(encoding: HarmonyEncoding, violation: bool) -> list[int]:
    """The target: analysis, then the final verdict, in harmony; the prompt already ends with `<|start|>assistant`."""
    def text(s: str) -> list[int]:
        return encoding.encode(s, disallowed_special=())

    return [CHANNEL, *text("analysis"), MESSAGE, *text(ANALYSIS[violation]), END, START, ASSISTANT, CHANNEL,
            *text("final"), MESSAGE, *text(FINAL[violation]), RETURN]
