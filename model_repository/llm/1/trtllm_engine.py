"""TensorRT-LLM's PyTorch backend through its LLM API (GPU): Gemma 3 27B-it, the GPU profile's LLM.

Gemma 3 27B does not go through `trtllm-build`, so it runs on the PyTorch
backend (TensorRT-LLM >= 1.0, as in NVIDIA's `tritonserver:<yy.mm>-trtllm-python-py3`
image). One `LLM` serves every request of the instance with in-flight
batching; KV-cache block reuse lets a turn reuse the blocks of the system
prompt and history its call's previous turn computed. Precision comes with
the checkpoint: on H100 an FP8 checkpoint (ModelOpt) and `kv_cache_dtype: fp8`;
A100 has no FP8, so BF16 or a W4A16 AWQ checkpoint there.

Same interface as llama_cpp_engine.LlamaCppEngine; TensorRT-LLM is imported
only here, so the CPU profile never needs it.
"""

from __future__ import annotations

import random
import threading
from typing import Iterator


class TrtLlmEngine:
    def __init__(self, model: str, tensor_parallel_size: int = 1, max_seq_len: int = 8192,
                 max_batch_size: int = 32, free_gpu_memory_fraction: float = 0.85, kv_cache_dtype: str = "auto"):
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.max_seq_len = max_seq_len
        self.llm = LLM(model=model, tensor_parallel_size=tensor_parallel_size, max_seq_len=max_seq_len,
                       max_batch_size=max_batch_size,
                       kv_cache_config=KvCacheConfig(enable_block_reuse=True,
                                                     free_gpu_memory_fraction=free_gpu_memory_fraction,
                                                     dtype=kv_cache_dtype))
        # Gemma ends a reply with <end_of_turn>, which is not its tokenizer's eos
        ends = {self.tokenizer.eos_token_id, self.tokenizer.convert_tokens_to_ids("<end_of_turn>")}
        self._end_ids = sorted(i for i in ends if isinstance(i, int) and i != self.tokenizer.unk_token_id)
        self._submit = threading.Lock()

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "TrtLlmEngine":
        model = params.get("model", "").strip()
        if not model:
            raise ValueError("engine trtllm needs config parameter 'model' (a Hugging Face checkpoint directory)")
        return cls(model, tensor_parallel_size=int(params.get("tensor_parallel_size", 1)),
                   max_seq_len=int(params.get("max_seq_len", 8192)),
                   max_batch_size=int(params.get("max_batch_size", 32)),
                   free_gpu_memory_fraction=float(params.get("free_gpu_memory_fraction", 0.85)),
                   kv_cache_dtype=params.get("kv_cache_dtype", "auto"))

    def generate(self, messages: list[dict], max_tokens: int, temperature: float,
                 stop: list[str]) -> Iterator[tuple[str, str | None]]:
        """(text delta, finish reason) pairs; closing the generator aborts the request in the engine.

        Raises ValueError for a conversation longer than the context.
        """
        from tensorrt_llm import SamplingParams

        # token ids, not text: the template's text already holds <bos>, which tokenizing again would double
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False)
        if len(prompt) + max_tokens > self.max_seq_len:
            raise ValueError(f"the conversation is {len(prompt)} tokens; with MAX_TOKENS {max_tokens} it does not "
                             f"fit the {self.max_seq_len}-token context: drop early turns")
        # a seed of its own: the runtime's default seed is 0 for every request, so equal prompts would get equal replies
        sampling = SamplingParams(max_tokens=max_tokens, stop=stop or None, stop_token_ids=self._end_ids,
                                  seed=random.getrandbits(32),
                                  **({"temperature": temperature} if temperature > 0 else {"top_k": 1}))
        with self._submit:
            # called from a worker thread with no event loop: the result is iterated synchronously
            result = self.llm.generate_async(prompt, sampling, streaming=True)
        try:
            for output in result:
                completion = output.outputs[0]
                if completion.text_diff or completion.finish_reason:
                    yield completion.text_diff, completion.finish_reason
        finally:
            if not result.finished:
                result.abort()

    def shutdown(self) -> None:
        self.llm.shutdown()
