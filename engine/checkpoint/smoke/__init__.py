"""The trained smoke model: a tiny gpt-oss that answers one demo policy in well-formed harmony.

A fixture and demo, not a classifier. The "smoke" preset (2 layers, hidden 64, 4 experts, the real 201,088-token
vocabulary) is trained on the CPU, in a minute or two, to answer the bundled `smoke` policy ("does the content mention
bananas?") with a short analysis message and then a JSON verdict. It knows nothing else: its only purpose is that the
quickstart and the end-to-end tests see real, parseable verdicts from the real prompt renderer, parser and checkpoint
layout, where random weights could only produce parse failures.

Training data (`data`) is generated from word lists read off the vocabulary, with a fixed seed; the policy's golden
set (`smoke.golden.jsonl`) is never trained on and is the held-out check (`evaluation`). Prompts are rendered by
`PromptRenderer` exactly as in serving and the loss covers the completion tokens only (`training`). Three things keep
a run to about a minute on a busy 2-core machine:

- the policy prefix, most of every prompt, runs once per batch and its keys and values are shared by the batch;
- the softmax runs over the completion's own tokens plus 2,048 sampled ones, not all 201,088: the output rows
  nobody trains keep their random init, far below the trained ones, so full-vocabulary greedy decoding still
  picks the trained tokens (which `evaluation.evaluate` checks, on the reloaded checkpoint);
- torch runs on one thread (see `training.torch_settings`).

The result is written in the published layout (BF16 tensors, MXFP4 experts). MXFP4 rounds the expert weights, so the
last steps hold the experts at their quantized values and let the rest of the model adapt to them: what is cached
is exactly what gets served.

Determinism: one seed gives the same bytes on one machine (same torch build, same CPU): torch and the data are
seeded, the order is fixed, torch runs on one thread with deterministic algorithms. Across CPUs with other vector
units float rounding may differ, so bitwise equality across machines is not promised.

The trained checkpoint is cached (`cache`) under `<cache>/models/smoke-trained-seed<N>-<key>`; the key covers the
seed, the depth, the source of the modules that decide the trained bytes and the policy file, so a change to any of
them retrains.
"""
