"""On-policy distillation: the student samples completions of the batch's prompts, the teacher scores them.

With `RedConfig(lmbda > 0)` a share `lmbda` of the micro-batches is replaced, before the optimizer step starts, by
the student's own completions of their prompts (TRL's GKD vocabulary: `lmbda`, `temperature`, `max_new_tokens`). The
student samples through its formed weights: the RED student is merged once per optimizer step (`merge_and_unload`:
W_T @ P formed once for the whole rollout) and generates with its KV cache through `generate`; a `train="weights"`
student samples itself. The teacher then scores the sampled tokens in the pass the loss already makes, and the
clone term compares activations on the sampled sequences.

Every random choice is a function of (seed, optimizer step, sample index): whether a micro-batch is on-policy, and
each row's sampling generator. So a resumed run samples what the uninterrupted one did (no RNG state to save), a
row samples the same tokens whatever batch it sits in (gradient accumulation 1 x 8 = 8 x 1), and each DDP rank
samples its own share (its process index is in the seed).
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from .losses import IGNORE_INDEX

ON_POLICY_KEY = "red_on_policy"  # marks a sampled micro-batch in its inputs dict (no cross entropy on it)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python runs (no `hash()` randomisation)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def is_on_policy(lmbda: float, seed: int, step: int, micro_batch: int) -> bool:
    """Whether micro-batch `micro_batch` of optimizer step `step` is sampled by the student (probability `lmbda`)."""
    if lmbda <= 0:
        return False
    if lmbda >= 1:
        return True
    draw = torch.rand((), generator=torch.Generator().manual_seed(derived_seed(seed, step, micro_batch, 0)))
    return bool(draw < lmbda)


class SeededRowSampler(LogitsProcessor):
    """Samples each row's next token from softmax(scores / temperature) with the row's own generator, and returns
    scores that make greedy decoding pick it: a row's tokens depend on its seed and its own logits only.

    Args:
        seeds: one seed per row.
        temperature: sampling temperature (> 0).
    """

    def __init__(self, seeds: list[int], temperature: float) -> None:
        self.seeds, self.temperature = seeds, temperature
        self.generators: list[torch.Generator] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """`scores` (B, V) next-token logits -> (B, V), 0 at the sampled token and -inf elsewhere."""
        if self.generators is None:  # on the scores' device, so sampling needs no copy to the CPU
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        chosen = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, self.generators)])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen[:, None], 0.0)


def split_prompts(inputs: dict[str, torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts of a prompt/completion batch, left-padded for generation.

    Args:
        inputs: `input_ids` (B, T), `labels` (B, T) with IGNORE_INDEX over each prompt (TRL's completion-only
            labels) and padding, `attention_mask` (B, T) (right padding).
    Returns:
        (prompt ids (B, P), attention mask (B, P)), left-padded with `pad_id`.
    """
    ids, labels = inputs["input_ids"], inputs["labels"]
    mask = inputs.get("attention_mask", torch.ones_like(ids))
    trained = labels != IGNORE_INDEX
    # a row's prompt: its tokens before the first trained one (all its tokens when none is trained)
    lengths = torch.where(trained.any(1), trained.int().argmax(1), mask.sum(1)).tolist()
    if min(lengths) == 0:
        raise ValueError("On-policy distillation (lmbda > 0) samples completions of prompts, but a row has no "
                         "prompt: give prompt/completion data (TRL's 'prompt' and 'completion' columns).")
    width = max(lengths)
    prompts = ids.new_full((ids.shape[0], width), pad_id)
    prompt_mask = torch.zeros_like(prompts)
    for row, n in enumerate(lengths):
        prompts[row, width - n:] = ids[row, :n]
        prompt_mask[row, width - n:] = 1
    return prompts, prompt_mask


@torch.no_grad()
def sample_completions(student: Any, prompts: torch.Tensor, prompt_mask: torch.Tensor, seeds: list[int], *,
                       max_new_tokens: int, temperature: float, eos_id: int | list[int] | None,
                       pad_id: int) -> dict[str, torch.Tensor]:
    """The student's completions of `prompts`, as a right-padded training batch.

    Args:
        student: a causal LM with `generate` (the merged student).
        prompts: (B, P) left-padded prompt ids; prompt_mask: (B, P).
        seeds: one sampling seed per row.
    Returns:
        `input_ids`, `attention_mask`, `labels` (B, T): each row its prompt then its completion up to and including
        the first eos; labels IGNORE_INDEX over the prompt and the padding.
    """
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                              pad_token_id=pad_id, use_cache=True)
    was_training = student.training
    student.eval()
    try:
        out = student.generate(input_ids=prompts, attention_mask=prompt_mask, generation_config=config,
                               logits_processor=LogitsProcessorList([SeededRowSampler(seeds, temperature)]))
    finally:
        student.train(was_training)
    eos = set(eos_id if isinstance(eos_id, (list, tuple)) else [] if eos_id is None else [eos_id])
    rows = []
    for row in range(prompts.shape[0]):
        prompt = prompts[row][prompt_mask[row].bool()].tolist()
        completion = out[row, prompts.shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(completion) if t in eos), len(completion))
        rows.append((prompt, completion[:end]))
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = prompts.new_full((len(rows), width), pad_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(rows):
        tokens = torch.tensor(prompt + completion, device=prompts.device)
        input_ids[row, : len(tokens)] = tokens
        attention_mask[row, : len(tokens)] = 1
        labels[row, len(prompt): len(tokens)] = tokens[len(prompt):]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class OnPolicyMixin:
    """The rollouts of `RedDistillationTrainer` (a base before `SFTTrainer`): with `lmbda > 0`, the on-policy
    micro-batches of each optimizer step are replaced by the student's samples before the step's first forward.
    `rollout_seconds` adds up the time spent sampling."""

    rollout_seconds = 0.0

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
        """Trainer's micro-batches of one optimizer step; with `lmbda > 0` the on-policy ones replaced by the
        student's samples before the step starts, and the trained tokens counted on what is trained (so the loss is
        normalised exactly under gradient accumulation)."""
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.lmbda > 0 and batches:  # only the training loop asks for batch samples
            batches = self._with_rollouts(batches)
            num_items = self._get_num_items_in_batch(batches, device)
        return batches, num_items

    def _with_rollouts(self, batches: list[dict]) -> list[dict]:
        args, step = self.args, self.state.global_step
        chosen = [i for i in range(len(batches)) if is_on_policy(args.lmbda, args.seed, step, i)]
        if not chosen:
            return batches
        started = time.perf_counter()
        student = self.merged_student()  # W_T @ P formed once for the whole step's rollouts
        tokenizer = self.processing_class
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else student.config.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        starts = [0]
        for batch in batches:
            starts.append(starts[-1] + len(batch["input_ids"]))
        out = list(batches)
        for i in chosen:
            prompts, mask = split_prompts(batches[i], pad)
            # a row's seed: the step, this rank and its index among the step's samples (not its micro-batch)
            seeds = [derived_seed(args.seed, step, args.process_index, starts[i] + r) for r in range(len(prompts))]
            out[i] = {**sample_completions(student, prompts, mask, seeds, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature, eos_id=eos, pad_id=pad),
                      ON_POLICY_KEY: True}
        self.rollout_seconds += time.perf_counter() - started
        return out
