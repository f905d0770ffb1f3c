"""The training loop: the smoke preset in transformers' gpt-oss, trained on the CPU against `data`'s examples and
returned in the published layout (BF16 tensors, MXFP4 experts)."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from classification.policy import load_policy
from classification.render import PromptRenderer
from classification.tokens import VOCAB_SIZE
from classification.vocab import load_harmony_encoding
from engine.checkpoint import bf16, mxfp4
from engine.checkpoint.config import preset_dict
from engine.checkpoint.smoke.data import DISCLAIMER, KEYWORDS, PAD, POLICY_FILE, completion_ids, training_examples

if TYPE_CHECKING:
    import torch
    from openai_harmony import HarmonyEncoding

log = logging.getLogger(__name__)


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
def torch_settings(threads: int) -> Iterator[None]:
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
    with torch_settings(config.threads):
        tensors = _train(config, started)
    log.info("trained the smoke model in %.0f s", time.perf_counter() - started)
    return tensors


def _train(config: TrainConfig, started: float) -> dict[str, np.ndarray]:
    import torch

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
