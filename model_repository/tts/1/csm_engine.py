"""Sesame CSM-1B text-to-speech (transformers, GPU): the GPU profile's voice.

`generate(output_audio=True)` returns only when the whole utterance is done and
cannot be stopped in between, so the frame loop here is our own, the same steps
transformers' CSM generation takes: a backbone step samples codebook 0, the
depth decoder samples codebooks 1..N-1, and a frame whose codebooks are all the
end-of-audio id (0) ends the utterance. Cancellation is checked every frame
(80 ms of audio).

Audio leaves every few frames through `MimiStream`, which decodes each chunk of
codes to exactly the samples one `codec_model.decode()` of the whole utterance
would give: Mimi's decoder is causal, its transformer keeps a KV cache, and its
stateless convolutions get as much left context as their receptive field.

RATE is validated by the model but ignored here: CSM has no speaking-rate
control, and time-stretching streamed chunks would cost quality for little use.

Written against transformers 5.x (the `cache` keyword, `MimiDecoderModel`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import wave
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _never() -> bool:
    return False


class CsmEngine:
    """Streams a CSM model's speech frame by frame; stop it by closing the generator or through `is_cancelled`."""

    def __init__(self, model, tokenize: Callable[[str], list[int]], *, voice_name: str, speaker: int = 0,
                 max_audio_seconds: float = 20.0, seconds_per_char: float = 0.15, first_chunk_frames: int = 2,
                 chunk_frames: int = 4, temperature: float = 0.9, top_k: int = 50,
                 voice_prompt: tuple[str, np.ndarray] | None = None):
        """`tokenize` turns "[speaker]text" into the backbone's text ids (begin and end of text included);
        `voice_prompt` is (transcript, 24 kHz float audio) spoken by `speaker`, so every utterance keeps that voice."""
        self.model = model.eval()
        self.codec = model.codec_model
        self.tokenize = tokenize
        self.voice_name = voice_name
        self.speaker = speaker
        self.sample_rate = int(self.codec.config.sampling_rate)
        self.frame_rate = float(self.codec.config.frame_rate)
        self.max_frames = max(1, round(max_audio_seconds * self.frame_rate))
        self.seconds_per_char = seconds_per_char
        if first_chunk_frames < 1 or chunk_frames < 1:
            raise ValueError("csm: first_chunk_frames and chunk_frames must be at least 1")
        self.first_chunk_frames, self.chunk_frames = first_chunk_frames, chunk_frames
        self.temperature, self.top_k = temperature, top_k
        self.num_codebooks = model.config.num_codebooks
        self.eos = model.config.codebook_eos_token_id
        self.codebook_size = self.codec.config.codebook_size
        self.device = next(model.parameters()).device
        self._prefix = self._prefill_voice_prompt(voice_prompt) if voice_prompt else None

    @classmethod
    def from_params(cls, params: dict[str, str]) -> "CsmEngine":
        """From the config's parameters: `model` (hub id or local dir), `device`, `dtype`, `speaker`, `voice`,
        `voice_prompt_audio` (path, relative to the model dir or in its hub repo) + `voice_prompt_text`,
        `max_audio_seconds`, `seconds_per_char`, `first_chunk_frames`, `chunk_frames`, `temperature`, `top_k`."""
        from transformers import AutoTokenizer, CsmForConditionalGeneration

        model_id = params["model"]
        device = params.get("device", "cuda")
        dtype = params.get("dtype", "bfloat16")
        if dtype not in DTYPES:
            raise ValueError(f"csm: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError("csm: device is cuda but torch sees no GPU")
        model = CsmForConditionalGeneration.from_pretrained(model_id, dtype=DTYPES[dtype]).to(device)
        model.codec_model.float()  # the codec is small; float32 keeps its audio clean
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        speaker = int(params.get("speaker", "0"))

        prompt = None
        if params.get("voice_prompt_audio"):
            text = params.get("voice_prompt_text", "").strip()
            if not text:
                raise ValueError("csm: voice_prompt_audio needs its transcript in voice_prompt_text")
            path = _model_file(model_id, params["voice_prompt_audio"])
            prompt = (text, _read_wav(path, int(model.codec_model.config.sampling_rate)))

        def number(key, default, kind=float):
            return kind(params.get(key, default))

        return cls(model, lambda s: tokenizer(s, add_special_tokens=True)["input_ids"],
                   voice_name=params.get("voice", f"csm-1b-speaker-{speaker}"), speaker=speaker,
                   max_audio_seconds=number("max_audio_seconds", 20.0),
                   seconds_per_char=number("seconds_per_char", 0.15),
                   first_chunk_frames=number("first_chunk_frames", 2, int),
                   chunk_frames=number("chunk_frames", 4, int),
                   temperature=number("temperature", 0.9), top_k=number("top_k", 50, int), voice_prompt=prompt)

    # -- the utterance ---------------------------------------------------------
    def synthesize(self, text: str, rate: float = 1.0,
                   is_cancelled: Callable[[], bool] = _never) -> Iterator[np.ndarray]:
        """int16 chunks of `first_chunk_frames`, then `chunk_frames` frames; `rate` is ignored (see module doc)."""
        stream = MimiStream(self.codec)
        pending, size = [], self.first_chunk_frames
        with contextlib.closing(self.frames(text, is_cancelled)) as frames:
            for frame in frames:
                pending.append(frame)
                if len(pending) >= size:
                    yield _pcm16(stream.decode(torch.stack(pending, dim=-1)))
                    pending, size = [], self.chunk_frames
        if pending and not is_cancelled():
            yield _pcm16(stream.decode(torch.stack(pending, dim=-1)))

    @torch.inference_mode()
    def frames(self, text: str, is_cancelled: Callable[[], bool] = _never) -> Iterator[torch.Tensor]:
        """Codebook frames, (1, num_codebooks) each, until the end-of-audio frame (not yielded) or the length limit."""
        ids = self.tokenize(f"[{self.speaker}]{text}")
        cache = copy.deepcopy(self._prefix) if self._prefix is not None else None
        used = len(ids) + (cache.get_seq_length() if cache is not None else 0)
        room = self.model.config.max_position_embeddings - used
        limit = min(self.max_frames, room, max(1, round((1.0 + self.seconds_per_char * len(text)) * self.frame_rate)))
        if limit <= 0:
            raise ValueError(f"csm: {len(ids)} text tokens leave no room for audio in the model's context")
        embeds = self.model.embed_text_tokens(torch.tensor([ids], device=self.device))
        out = self.model.backbone_model(inputs_embeds=embeds, cache=cache, use_cache=True)
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        for n in range(limit):
            if is_cancelled():
                return
            if n:
                hidden = self.model.backbone_model(input_ids=frame[:, None, :], cache=cache,
                                                   use_cache=True).last_hidden_state[:, -1]
            frame = self._next_frame(hidden)
            if bool((frame == self.eos).all()):
                return
            yield frame

    def _next_frame(self, hidden: torch.Tensor) -> torch.Tensor:
        """Codebook 0 from the backbone's last hidden state, the others from the depth decoder."""
        codes = [self._sample(self.model.lm_head(hidden))]
        depth = self.model.depth_decoder
        ids = torch.stack([torch.zeros_like(codes[0]), codes[0]], dim=-1)  # position 0 holds the hidden state
        out = depth(input_ids=ids, backbone_last_hidden_state=hidden, use_cache=True, logits_to_keep=1)
        for i in range(1, self.num_codebooks):
            codes.append(self._sample(out.logits[:, -1]))
            if i + 1 < self.num_codebooks:
                out = depth(input_ids=codes[-1][:, None], cache=out.cache, use_cache=True, logits_to_keep=1)
        return torch.stack(codes, dim=-1)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Top-k sampling at the configured temperature (0: greedy); ids Mimi cannot decode are never drawn."""
        logits = logits[..., : self.codebook_size].float()
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(torch.softmax(logits, dim=-1), 1)[..., 0]

    @torch.inference_mode()
    def _prefill_voice_prompt(self, prompt: tuple[str, np.ndarray]):
        """The backbone's KV cache after the voice prompt segment (text, its audio, end of audio), made once."""
        text, samples = prompt
        ids = torch.tensor([self.tokenize(f"[{self.speaker}]{text}")], device=self.device)
        audio = torch.from_numpy(samples).to(self.device, torch.float32)[None, None]
        codes = self.codec.encode(audio).audio_codes[:, : self.num_codebooks].transpose(1, 2)  # (1, T, C)
        codes = torch.cat([codes, torch.full_like(codes[:, :1], self.eos)], dim=1)
        embeds = torch.cat([self.model.embed_text_tokens(ids), self.model.backbone_model.embed_tokens(codes)], dim=1)
        return self.model.backbone_model(inputs_embeds=embeds, use_cache=True).cache


class MimiStream:
    """Decodes one utterance's Mimi codes chunk by chunk, sample for sample as one `decode()` of them all.

    Mimi's decoder is upsample (transposed conv) -> transformer -> SEANet (convs,
    transposed convs), all causal. The transformer keeps its KV cache between
    chunks; the convolutions keep no state, so each gets the last frames before
    the chunk as left context, as many as its receptive field needs, and only
    the chunk's own samples are kept.
    """

    def __init__(self, codec):
        decoder = codec.decoder
        config = codec.config
        if not config.use_causal_conv or config.trim_right_ratio != 1.0:
            raise ValueError("csm: streaming Mimi decode needs a causal codec (use_causal_conv, trim_right_ratio 1)")
        self.quantizer, self.upsample = codec.quantizer, decoder.upsample
        self.transformer, self.seanet = decoder.decoder_transformer, decoder.decoder_seanet
        self.samples_per_latent = int(np.prod(config.upsampling_ratios))
        self.upsample_context = _context(self.upsample, 0) if self.upsample is not None else 0
        self.seanet_context = _context(self.seanet, 0)
        self._codes_tail = self._latent_tail = None
        self._cache = None

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (1, num_codebooks, frames) -> float audio (frames * samples per frame,), continuing the last chunk."""
        embeddings = self.quantizer.decode(codes)
        latents = self._with_context("_codes_tail", embeddings, self.upsample_context, self.upsample,
                                     self.upsample.conv.stride[0] if self.upsample is not None else 1)
        out = self.transformer(latents.transpose(1, 2), cache=self._cache, use_cache=True)
        self._cache = out.cache
        audio = self._with_context("_latent_tail", out.last_hidden_state.transpose(1, 2), self.seanet_context,
                                   self.seanet, self.samples_per_latent)
        return audio[0, 0]

    def _with_context(self, tail: str, x: torch.Tensor, context: int, layer: nn.Module | None, ratio: int):
        """`layer` run on x with the last `context` steps of earlier input in front; the output of x alone."""
        if layer is None:
            return x
        previous = getattr(self, tail)
        padded = x if previous is None else torch.cat([previous, x], dim=-1)
        setattr(self, tail, padded[..., -context:] if context else None)
        return layer(padded)[..., (padded.shape[-1] - x.shape[-1]) * ratio:]


def _context(module: nn.Module, need: int) -> int:
    """How many input steps before a chunk its output depends on, when `need` output steps before it must be exact too.

    Walks the causal layers from the output back: a conv of effective kernel k
    looks k - 1 steps back; a transposed conv of kernel k and stride s reaches
    floor((need + k - 1) / s) input steps back; a residual block adds its
    branch's reach.
    """
    from transformers.models.mimi.modeling_mimi import MimiConv1d, MimiConvTranspose1d, MimiResnetBlock

    if isinstance(module, MimiConv1d):
        if module.conv.stride[0] != 1:
            raise ValueError("csm: no streaming rule for a strided Mimi decoder conv")
        return need + int(module.padding_total)
    if isinstance(module, MimiConvTranspose1d):
        k, s = module.conv.kernel_size[0], module.conv.stride[0]
        return (need + k - 1) // s
    if isinstance(module, MimiResnetBlock):
        return max(_context(module.block, need), _context(module.shortcut, need))
    children = list(module.children())
    if isinstance(module, (nn.Sequential, nn.ModuleList)) or hasattr(module, "layers"):
        layers = module.layers if hasattr(module, "layers") else children
        for layer in reversed(list(layers)):
            need = _context(layer, need)
        return need
    if children:
        raise ValueError(f"csm: no streaming rule for Mimi layer {type(module).__name__}")
    return need  # pointwise: activations, identity


def _pcm16(audio: torch.Tensor) -> np.ndarray:
    return (audio.float().clamp(-1.0, 1.0) * 32767.0).round().to(torch.int16).cpu().numpy()


def _model_file(model_id: str, relative: str) -> str:
    """A file beside the weights: in the local model dir, or fetched from the model's hub repo."""
    if os.path.isabs(relative):
        return relative
    if os.path.isdir(model_id):
        return os.path.join(model_id, relative)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(model_id, relative)


def _read_wav(path: str, rate: int) -> np.ndarray:
    """16-bit PCM WAV -> mono float32 at `rate`."""
    import soxr

    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"csm: {path}: voice prompt must be 16-bit PCM WAV")
        samples = np.frombuffer(w.readframes(w.getnframes()), np.int16).reshape(-1, w.getnchannels())
        source_rate = w.getframerate()
    audio = samples.mean(axis=1).astype(np.float32) / 32768.0
    return soxr.resample(audio, source_rate, rate).astype(np.float32) if source_rate != rate else audio
