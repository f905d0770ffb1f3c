"""The trained smoke model: a tiny gpt-oss that answers one demo policy in well-formed harmony.

A fixture and demo, not a classifier. The "smoke" preset (2 layers, hidden 64, 4 experts, the real 201,088-token
vocabulary) is trained on the CPU, in a minute or two, to answer `policies/smoke.md` ("does the content mention
bananas?") with a short analysis message and then a JSON verdict. It knows nothing else: its only purpose is that the
quickstart and the end-to-end tests see real, parseable verdicts from the real prompt renderer, parser and checkpoint
layout, where random weights could only produce parse failures.

Training data is generated from word lists read off the vocabulary, with a fixed seed; the policy's golden set
(`policies/smoke.golden.jsonl`) is never trained on and is the held-out check. Prompts are rendered by
`PromptRenderer` exactly as in serving and the loss covers the completion tokens only. Three things keep a run
to about a minute on a busy 2-core machine:

- the policy prefix, most of every prompt, runs once per batch and its keys and values are shared by the batch;
- the softmax runs over the completion's own tokens plus 2,048 sampled ones, not all 201,088: the output rows
  nobody trains keep their random init, far below the trained ones, so full-vocabulary greedy decoding still
  picks the trained tokens (which `evaluate` checks, on the reloaded checkpoint);
- torch runs on one thread (see `_torch_settings`).

The result is written in the published layout (BF16 tensors, MXFP4 experts). MXFP4 rounds the expert weights, so the
last steps hold the experts at their quantized values and let the rest of the model adapt to them: what is cached
is exactly what gets served.

Determinism: one seed gives the same bytes on one machine (same torch build, same CPU): torch and the data are
seeded, the order is fixed, torch runs on one thread with deterministic algorithms. Across CPUs with other vector
units float rounding may differ, so bitwise equality across machines is not promised.

The trained checkpoint is cached under `<cache>/models/smoke-trained-seed<N>-<key>`; the key covers the seed, the
depth, this module's source and the policy file, so a change to either retrains.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from classification.content import Chat, Content, PromptResponse, Text, Turn
from classification.golden import GoldenItem, golden_path, load_golden
from classification.library import bundled_policy
from classification.render import PromptRenderer
from classification.tokens import CHANNEL, END, MESSAGE, RETURN, START, VOCAB_SIZE
from classification.vocab import O200K_MERGEABLE_COUNT, default_cache_dir, load_harmony_encoding
from engine.checkpoint import bf16, mxfp4
from engine.checkpoint.config import preset_dict
from engine.checkpoint.safetensors_io import read_header, read_tensor

if TYPE_CHECKING:
    import torch
    from openai_harmony import HarmonyEncoding

log = logging.getLogger(__name__)
# The code that is running, read once: a long-lived process must not file its training under a newer file's key.
_SOURCE = Path(__file__).read_bytes()

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
class TrainConfig:
    seed: int = 0
    layers: int | None = None  # None: the preset's depth
    steps: int = 320
    batch_size: int = 16
    lr: float = 4e-3
    warmup: int = 20
    quantized_steps: int = 60  # the last steps, with the experts held at their MXFP4 values
    negatives: int = 2048  # output tokens sampled per step into the softmax, besides the completion's own
    # The one token that carries the verdict is 1 of ~45 in a completion; weighting it up makes the rule, rather
    # than the format, the bulk of the gradient.
    decision_weight: float = 20.0
    threads: int = 1


@dataclass(frozen=True)
class Example:
    content: Content
    violation: bool


# ---------------------------------------------------------------------------------------------------------------
# Training data


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


# ---------------------------------------------------------------------------------------------------------------
# Training


def _model_config(layers: int | None) -> dict:
    raw = preset_dict("smoke", layers=layers)
    raw.pop("quantization_config")  # trained in float; quantized when written
    return raw


def build_model(layers: int | None) -> torch.nn.Module:
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(**_model_config(layers))
    config._attn_implementation = "eager"  # gpt-oss's attention sinks need the eager kernel
    return GptOssForCausalLM(config)


@dataclass(frozen=True)
class Batch:
    """The per-example part of the prompts (after the shared prefix) plus the completions, right-padded."""

    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [N] batch index of each predicted position
    cols: torch.Tensor  # [N] position whose hidden state predicts the next token
    targets: torch.Tensor  # [N] index of the next token in the candidate list
    weights: torch.Tensor  # [N] loss weight of each predicted token


def make_batch(tails: list[list[int]], completions: list[list[int]], index: Mapping[int, int],
               decision: int, decision_weight: float) -> Batch:
    """`decision` is the completion position where the verdict is decided; it gets `decision_weight`."""
    import torch

    seqs = [t + c for t, c in zip(tails, completions, strict=True)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows, cols, targets, weights = [], [], [], []
    for b, (tail, seq) in enumerate(zip(tails, seqs, strict=True)):
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        for at in range(len(tail), len(seq)):
            rows.append(b)
            cols.append(at - 1)
            targets.append(index[seq[at]])
            weights.append(decision_weight if at - len(tail) == decision else 1.0)
    return Batch(ids, mask, torch.tensor(rows), torch.tensor(cols), torch.tensor(targets), torch.tensor(weights))


def batch_loss(model: torch.nn.Module, prefix: torch.Tensor, batch: Batch, candidates: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the completion tokens over `candidates` (the targets first, then sampled negatives)."""
    import torch
    import torch.nn.functional as F
    from transformers import DynamicCache

    # The policy prefix is the same for every example: run it once and share its keys and values across the batch,
    # exactly as serving does with a cached prefix. It is most of each prompt, so this saves most of the work.
    cache = DynamicCache(config=model.config)
    model.model(input_ids=prefix[None], cache=cache, use_cache=True)
    cache.batch_repeat_interleave(len(batch.input_ids))
    mask = torch.cat([torch.ones(len(batch.input_ids), len(prefix), dtype=torch.long), batch.attention_mask], 1)
    hidden = model.model(input_ids=batch.input_ids, attention_mask=mask, cache=cache,
                         use_cache=True).last_hidden_state
    # Gathering the output rows keeps the gradient sparse: only the candidates' rows move.
    rows = F.embedding(candidates, model.lm_head.weight, sparse=True)
    logits = hidden[batch.rows, batch.cols] @ rows.T
    losses = F.cross_entropy(logits.float(), batch.targets, reduction="none")
    return (losses * batch.weights).sum() / batch.weights.sum()


def keyword_rows(encoding: HarmonyEncoding) -> torch.Tensor:
    """A mask of the embedding rows that training may move: the pieces the keyword's spellings tokenize into.

    Every other row keeps its random init. That is what makes the model robust to unseen words: the content it
    is served is mostly tokens it never trained on, and to the model those look exactly like the word lists did.
    (Trained rows grow far from the init, so a model that trains them all is thrown by the first untrained token.)
    """
    import torch

    rows = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    for form in KEYWORDS:
        for context in ("{}", " {}", "'{}'"):
            for token in encoding.encode(context.format(form), disallowed_special=()):
                if len(encoding.decode([token]).strip(" '")) > 1:
                    rows[token] = True
    return rows


def _only_rows(rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Drop a sparse embedding gradient's entries outside `rows`."""
    import torch

    grad = grad.coalesce()
    keep = rows[grad.indices()[0]]
    # A subset of a coalesced tensor's entries is still sorted and unique, so the invariant check can be skipped.
    return torch.sparse_coo_tensor(grad.indices()[:, keep], grad.values()[keep], grad.shape, check_invariants=False,
                                   is_coalesced=True)


def _quantize_experts_(model: torch.nn.Module) -> None:
    """Replace the expert weights by their MXFP4 values and freeze them."""
    import torch

    for name, param in model.named_parameters():
        if name.endswith(("gate_up_proj", "down_proj")):
            with torch.no_grad():
                param.copy_(torch.from_numpy(_mxfp4_roundtrip(param.detach().numpy())))
            param.requires_grad_(False)


def _mxfp4_roundtrip(weight: np.ndarray) -> np.ndarray:
    """[E, in, out] parameter -> the same after MXFP4 quantization along `in`, as a loaded checkpoint has it."""
    blocks, scales = mxfp4.quantize(weight.transpose(0, 2, 1))
    return bf16.to_float32(mxfp4.dequantize(blocks, scales)).transpose(0, 2, 1).copy()


@contextmanager
def _torch_settings(threads: int) -> Iterator[None]:
    """Pinned threads and deterministic kernels, restored afterwards.

    One thread is both the deterministic choice and, on a busy 2-core machine, by far the fastest: this model's ops
    are so small that a second OpenMP thread mostly waits at barriers, and when the cores are shared those waits
    make a step 20 times slower.
    """
    import torch

    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def train(config: TrainConfig) -> dict[str, np.ndarray]:
    """Train the smoke model; returns its checkpoint tensors (BF16 bits as uint16, MXFP4 as uint8) by name."""
    log.info("training the smoke model (%s), seed %d: about a minute, once; cached afterwards", DISCLAIMER,
             config.seed)
    started = time.perf_counter()
    with _torch_settings(config.threads):
        tensors = _train(config, started)
    log.info("trained the smoke model in %.0f s", time.perf_counter() - started)
    return tensors


def _train(config: TrainConfig, started: float) -> dict[str, np.ndarray]:
    import torch

    from classification.policy import load_policy  # only the policy file parser; engine otherwise stays below server

    torch.manual_seed(config.seed)
    sampler = torch.Generator().manual_seed(config.seed)
    encoding = load_harmony_encoding()
    policy = load_policy(POLICY_FILE)
    renderer = PromptRenderer(encoding, model_fingerprint="smoke-training")
    prefix = renderer.prefix(policy.body, policy.reasoning_effort)
    examples = training_examples(config.seed, encoding)
    completions = {v: completion_ids(encoding, v) for v in (False, True)}
    outputs = sorted(set(completions[False]) | set(completions[True]))
    # The first token where the two answers part: the verdict itself (" mentions" or " does").
    decision = next(i for i, pair in enumerate(zip(completions[False], completions[True], strict=False))
                    if pair[0] != pair[1])
    index = {token: i for i, token in enumerate(outputs)}
    is_output = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    is_output[outputs] = True
    prefix_ids = torch.tensor(prefix.ids)

    model = build_model(config.layers)
    model.train()
    embed = model.model.embed_tokens
    embed.sparse = True
    embed.weight.register_hook(partial(_only_rows, keyword_rows(encoding)))
    sparse = [embed.weight, model.lm_head.weight]
    dense = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in sparse)]
    optimizers = [torch.optim.SparseAdam(sparse, lr=config.lr, betas=(0.9, 0.98)),
                  torch.optim.AdamW(dense, lr=config.lr, betas=(0.9, 0.98), weight_decay=0.0)]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: _lr_factor(s, config)) for o in optimizers]
    for step in range(config.steps):
        if step == config.steps - config.quantized_steps:
            _quantize_experts_(model)
        chosen = list(itertools.islice(examples, config.batch_size))
        batch = make_batch([renderer.render(prefix, e.content).ids[len(prefix.ids):] for e in chosen],
                           [completions[e.violation] for e in chosen], index, decision, config.decision_weight)
        negatives = torch.randperm(VOCAB_SIZE, generator=sampler)[:config.negatives]
        candidates = torch.cat([torch.tensor(outputs), negatives[~is_output[negatives]]])
        loss = batch_loss(model, prefix_ids, batch, candidates)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in dense if p.grad is not None], 1.0)
        for optimizer, schedule in zip(optimizers, schedules, strict=True):
            optimizer.step()
            schedule.step()
        if step % 20 == 0 or step == config.steps - 1:
            log.debug("step %d loss %.4f %.1f s", step, loss.item(), time.perf_counter() - started)
    return checkpoint_tensors(model)


def _lr_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def checkpoint_tensors(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's parameters in the published layout: experts as MXFP4 of W [out, in], the rest BF16."""
    tensors: dict[str, np.ndarray] = {}
    for name, param in model.state_dict().items():
        value = param.detach().float().numpy()
        if name.endswith(("gate_up_proj", "down_proj")):
            blocks, scales = mxfp4.quantize(value.transpose(0, 2, 1))
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
        else:
            tensors[name] = bf16.from_float32(value)
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Cache


def cache_key(seed: int, layers: int | None) -> str:
    """Changes whenever the trained bytes could: seed, depth, this module's source, the policy file."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"seed": seed, "layers": layers}, sort_keys=True).encode())
    digest.update(_SOURCE)
    digest.update(POLICY_FILE.read_bytes())
    return digest.hexdigest()[:16]


def _stem(seed: int, layers: int | None) -> str:
    return f"smoke-trained-seed{seed}" + (f"-L{layers}" if layers is not None else "")


def cached_dir(seed: int = 0, layers: int | None = None, cache_dir: Path | None = None) -> Path:
    root = cache_dir if cache_dir is not None else default_cache_dir()
    return root / "models" / f"{_stem(seed, layers)}-{cache_key(seed, layers)}"


def ensure_trained(seed: int = 0, layers: int | None = None, cache_dir: Path | None = None) -> Path:
    """The cached trained checkpoint (published layout, tokenizer included), trained and written first if needed."""
    from engine.checkpoint.synth import synthesize

    target = cached_dir(seed, layers, cache_dir)
    if (target / "config.json").is_file():
        return target
    weights = train(TrainConfig(seed=seed, layers=layers))
    target.parent.mkdir(parents=True, exist_ok=True)
    # A private directory, renamed into place whole: a concurrent run (tests, quickstart) never sees half a model.
    partial_dir = Path(tempfile.mkdtemp(prefix=f"{target.name}.", suffix=".partial", dir=target.parent))
    try:
        synthesize("smoke", partial_dir, seed=seed, layers=layers, weights=weights)
        partial_dir.rename(target)
    except OSError:
        if not (target / "config.json").is_file():  # not merely another run finishing first
            raise
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
    _remove_superseded(target, _stem(seed, layers))
    return target


def _remove_superseded(target: Path, stem: str) -> None:
    """Older trainings of the same seed and depth (other code or policy versions): 80 MB each, never read again."""
    current = re.compile(re.escape(stem) + r"-[0-9a-f]{16}")
    for old in target.parent.glob(f"{stem}-*"):
        if old != target and current.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)


def trained_weights(seed: int = 0, layers: int | None = None, cache_dir: Path | None = None) -> dict[str, np.ndarray]:
    """The trained tensors by name, from the cache (training once if needed)."""
    return dict(read_checkpoint(ensure_trained(seed, layers, cache_dir)))


def read_checkpoint(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of a checkpoint directory, as stored (BF16 as uint16 bits)."""
    for shard in sorted(path.glob("*.safetensors")):
        header = read_header(shard)
        for name, entry in header.tensors.items():
            yield name, read_tensor(entry, shard)


def weights_digest(weights: Mapping[str, np.ndarray]) -> str:
    """One sha256 over every tensor's name and bytes, for determinism checks."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode() + b"\x00" + np.ascontiguousarray(weights[name]).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on the held-out golden set


@dataclass(frozen=True)
class Evaluation:
    """How the checkpoint did on the golden set."""

    total: int
    ok: int  # verdicts that parse with status ok
    follows_rule: int  # verdicts (of any status) whose violation equals the golden label
    failures: tuple[str, ...]  # one line per item that is not ok or breaks the rule, with its completion

    @property
    def ok_rate(self) -> float:
        return self.ok / self.total

    @property
    def rule_rate(self) -> float:
        return self.follows_rule / self.total

    def summary(self) -> str:
        return (f"smoke model ({DISCLAIMER}): {self.ok}/{self.total} ok ({self.ok_rate:.0%}), "
                f"{self.follows_rule}/{self.total} follow the rule ({self.rule_rate:.0%})")


def golden_items() -> list[GoldenItem]:
    """The smoke policy's golden set: held out, never trained on."""
    return load_golden(golden_path(POLICY_FILE))


def evaluate(model_dir: Path, max_new_tokens: int = 64) -> Evaluation:
    """Greedy-decode every golden item with transformers over the full vocabulary, as served, and read the verdicts.

    The model is loaded the way the CPU executor loads it (MXFP4 experts dequantized, BF16), so what is measured is
    the checkpoint on disk, after quantization.
    """
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    from classification.completion import parse_completion
    from classification.policy import load_policy
    from classification.tokens import STOP_TOKEN_IDS
    from classification.verdict import OK, parse_verdict

    encoding = load_harmony_encoding(model_dir)
    policy = load_policy(POLICY_FILE)
    renderer = PromptRenderer(encoding, model_fingerprint="smoke-eval")
    prefix = renderer.prefix(policy.body, policy.reasoning_effort)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.bfloat16)
    items = golden_items()
    ok = follows = 0
    failures: list[str] = []
    with _torch_settings(1), torch.no_grad():
        for item in items:
            prompt = renderer.render(prefix, item.content).ids
            out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=PAD)
            completion = out[0, len(prompt):].tolist()
            finish = "stop" if completion and completion[-1] in STOP_TOKEN_IDS else "length"
            verdict = parse_verdict(parse_completion(completion, encoding.decode), policy.output, finish)
            ok += verdict.status == OK
            follows += verdict.violation == item.violation
            if verdict.status != OK or verdict.violation != item.violation:
                failures.append(f"{item.id}: {verdict.status}, violation {verdict.violation}, expected "
                                f"{item.violation}: {encoding.decode(completion)!r}")
    return Evaluation(len(items), ok, follows, tuple(failures))
