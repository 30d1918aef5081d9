"""llm: chat messages in, text deltas out as the engine makes them (contract: ../../README.md)."""

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "common"))

from streaming import RequestError, StreamingModel, required, scalar, tensor, text  # noqa: E402

ROLES = ("system", "user", "assistant")
MAX_STOPS = 8
MAX_STOP_CHARS = 64


@dataclass
class Turn:
    messages: list
    max_tokens: int
    temperature: float
    stop: list
    finish_reason: str = "stop"


class TritonPythonModel(StreamingModel):
    max_concurrency = 2

    def setup(self, params):
        engine = required(params, "engine")
        if engine == "llama_cpp":
            from llama_cpp_engine import LlamaCppEngine

            self.engine = LlamaCppEngine.from_params(params, int(params.get("max_concurrency", self.max_concurrency)))
        elif engine == "trtllm":
            from trtllm_engine import TrtLlmEngine

            self.engine = TrtLlmEngine.from_params(params)
        else:
            raise ValueError(f"llm: unknown engine {engine!r} (llama_cpp, trtllm)")

    def parse(self, request):
        temperature = scalar(request, "TEMPERATURE", float, 0.7, low=0.0, high=2.0)
        if not math.isfinite(temperature):
            raise RequestError("TEMPERATURE must be a finite number in [0, 2]")
        return Turn(messages=parse_messages(text(request, "MESSAGES")),
                    max_tokens=scalar(request, "MAX_TOKENS", int, 128, low=1, high=1024),
                    temperature=temperature, stop=parse_stop(tensor(request, "STOP", optional=True)))

    def stream(self, turn, is_cancelled):
        replies = self.engine.generate(turn.messages, turn.max_tokens, turn.temperature, turn.stop)
        try:
            for delta, finish_reason in replies:
                if finish_reason:
                    turn.finish_reason = "length" if finish_reason == "length" else "stop"
                if delta:
                    yield {"TEXT": delta, "FINISH_REASON": ""}
        except ValueError as e:  # the engine's word for "this request cannot be served as given"
            raise RequestError(str(e)) from None
        finally:
            replies.close()

    def closing_outputs(self, turn, reason):
        return {"TEXT": "", "FINISH_REASON": turn.finish_reason}

    def shutdown(self):
        self.engine.shutdown()


def parse_messages(raw: str) -> list:
    """MESSAGES: a JSON list of {"role": system|user|assistant, "content": str}; other keys are dropped."""
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"MESSAGES is not valid JSON: {e}") from None
    if not isinstance(messages, list) or not messages:
        raise RequestError('MESSAGES must be a non-empty JSON list of {"role": ..., "content": ...} objects')
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"MESSAGES[{i}] must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RequestError(f"MESSAGES[{i}].role is {role!r}; it must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RequestError(f"MESSAGES[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    if all(m["role"] == "system" for m in clean):
        raise RequestError("MESSAGES holds only system messages; there is nothing to answer")
    return clean


def parse_stop(array) -> list:
    if array is None:
        return []
    values = array.reshape(-1)
    if values.size > MAX_STOPS:
        raise RequestError(f"STOP holds {values.size} strings, more than {MAX_STOPS}")
    stops = []
    for raw in values:
        try:
            stop = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError:
            raise RequestError("STOP strings must be valid UTF-8") from None
        if not stop or len(stop) > MAX_STOP_CHARS:
            raise RequestError(f"each STOP string must hold 1 to {MAX_STOP_CHARS} characters")
        stops.append(stop)
    return stops
