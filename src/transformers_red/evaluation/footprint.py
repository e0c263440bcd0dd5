"""What the width buys at deployment: parameters, weight bytes, KV cache per token, and generation speed.

RED narrows the residual stream (hidden_size d_T -> d_S) and nothing else: the layer count, the attention heads,
the KV heads and head_dim are the teacher's. K and V are computed in the attention's own width
(num_key_value_heads x head_dim), so **the KV cache per token is the teacher's**; the weights and the matmuls
over the residual stream shrink.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch


def dtype_bytes(dtype: torch.dtype | str | None) -> int:
    """Bytes per element of `dtype` (a torch dtype or its name, "torch.bfloat16" too); float32 when None."""
    if dtype is None:
        return 4
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"Unknown dtype {name!r}: give a torch dtype such as 'bfloat16' or 'float32'.")
    return torch.empty((), dtype=dtype).element_size()


def _field(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def config_dtype(config: Any) -> str:
    """The weights' dtype a config records (`dtype`, or `torch_dtype` in older files); "float32" when absent."""
    dtype = _field(config, "dtype") or _field(config, "torch_dtype") or "float32"
    return str(dtype).removeprefix("torch.")


def attention_shape(config: Any) -> tuple[int, int, int]:
    """(num_hidden_layers, num_key_value_heads, head_dim) of a `PretrainedConfig` or its dict (a multimodal one's
    text config): what sets the KV cache, and what RED leaves as the teacher's."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = _field(config, "num_attention_heads")
    head_dim = _field(config, "head_dim") or _field(config, "hidden_size") // heads
    return _field(config, "num_hidden_layers"), _field(config, "num_key_value_heads") or heads, head_dim


def kv_cache_bytes_per_token(config: Any, dtype: torch.dtype | str | None = None) -> int:
    """Bytes of K and V one token adds to the cache: 2 x num_hidden_layers x num_key_value_heads x head_dim x
    bytes per element (`dtype`, default the config's). Full attention; a sliding-window layer stops growing at
    its window."""
    layers, kv_heads, head_dim = attention_shape(config)
    return 2 * layers * kv_heads * head_dim * dtype_bytes(dtype or config_dtype(config))


def model_footprint(config: Any, num_parameters: int | None, dtype: torch.dtype | str | None = None) -> dict[str, Any]:
    """{"parameters", "weight_bytes", "kv_cache_bytes_per_token"} of a causal LM in `dtype` (default: its config's).

    `weight_bytes` = parameters x bytes per element (tied weights counted once, as safetensors stores them);
    None when the parameter count is unknown."""
    dtype = dtype or config_dtype(config)
    return {"parameters": num_parameters,
            "weight_bytes": None if num_parameters is None else num_parameters * dtype_bytes(dtype),
            "kv_cache_bytes_per_token": kv_cache_bytes_per_token(config, dtype)}


@torch.no_grad()
def _generation_seconds(model: Any, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Wall time of one greedy generation of exactly `new_tokens` tokens (no early stop at EOS)."""
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize(input_ids.device)
    start = time.perf_counter()
    model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, pad_token_id=0)
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize(input_ids.device)
    return time.perf_counter() - start


def measure_generation_speed(student: Any, teacher: Any, *, prompt_tokens: int = 32, new_tokens: int = 64,
                             batch_size: int = 1, repeats: int = 3) -> dict[str, Any]:
    """Greedy generation tokens/s of `student` and `teacher` on this machine, measured in one run.

    Both generate `new_tokens` tokens after the same `prompt_tokens`-token prompt ((batch_size, prompt_tokens)
    ids, no tokenizer needed), on their own device; one warm-up run each, then `repeats` alternating runs (so a
    machine that slows down or speeds up affects both), and the median time of each counts. Returns
    {"tokens_per_second": {"teacher", "student"}, "speedup" (student / teacher), the settings, "device", "dtype",
    "threads" (on CPU), "measured_with"}.
    """
    for name, value in (("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens), ("batch_size", batch_size),
                        ("repeats", repeats)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    vocab = student.config.get_text_config().vocab_size
    if teacher.config.get_text_config().vocab_size != vocab:
        raise ValueError("The student and the teacher have different vocabularies: not a student of this teacher.")
    ids = torch.arange(batch_size * prompt_tokens).reshape(batch_size, prompt_tokens).remainder(vocab - 1) + 1
    times: dict[str, list[float]] = {"teacher": [], "student": []}
    models = {"teacher": teacher, "student": student}
    modes = {name: model.training for name, model in models.items()}
    try:
        for name, model in models.items():
            model.eval()
            _generation_seconds(model, ids.to(model.device), new_tokens)  # warm-up: kernels, allocator
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(_generation_seconds(model, ids.to(model.device), new_tokens))
    finally:
        for name, model in models.items():
            model.train(modes[name])
    rate = {name: round(batch_size * new_tokens / statistics.median(t), 2) for name, t in times.items()}
    result = {"tokens_per_second": rate, "speedup": round(rate["student"] / rate["teacher"], 3),
              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch_size": batch_size, "repeats": repeats,
              "device": str(student.device), "dtype": str(student.dtype).removeprefix("torch."),
              "measured_with": "transformers generate (greedy)"}
    if student.device.type == "cpu":
        result["threads"] = torch.get_num_threads()
    return result
