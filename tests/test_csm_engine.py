"""The CSM engine's own frame loop and streamed Mimi decode, on a tiny random CSM built on CPU (no weights).

The real CSM-1B needs a GPU and gated weights; a tiny random `CsmConfig` runs
the same code path (backbone step, depth decoder, Mimi decode) in milliseconds
per frame, which is enough to prove the streaming, continuity and stopping.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the CSM engine's tests need it)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")
if not hasattr(transformers, "CsmForConditionalGeneration"):
    pytest.skip(f"transformers {transformers.__version__} has no CSM", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model_repository" / "tts" / "1"))
from csm_engine import CsmEngine, MimiStream  # noqa: E402

CODEBOOKS = 4
HOP = 1920  # samples per Mimi frame: 24 kHz / 12.5 Hz, as in the real codec
TEXT = "Hello there, this is a test."


def tokenize(text: str) -> list[int]:
    return [1] + [2 + ord(c) % 90 for c in text] + [3]


@pytest.fixture(scope="module")
def model():
    """A random CSM of a few thousand parameters whose Mimi keeps the real frame rate and upsampling ratios."""
    from transformers import CsmConfig, CsmForConditionalGeneration, MimiConfig

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: more threads only add contention on a shared machine
    codec = MimiConfig(hidden_size=32, num_filters=4, codebook_size=64, codebook_dim=16, num_quantizers=CODEBOOKS,
                       vector_quantization_hidden_dimension=16, upsample_groups=32, num_hidden_layers=2,
                       intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
                       sliding_window=8)  # shorter than the utterances below, so the KV cache's window is exercised
    depth = dict(num_codebooks=CODEBOOKS, backbone_hidden_size=32, vocab_size=64, hidden_size=16, intermediate_size=32,
                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=CODEBOOKS)
    config = CsmConfig(num_codebooks=CODEBOOKS, vocab_size=64, text_vocab_size=100, hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       max_position_embeddings=512, pad_token_id=99, bos_token_id=1, audio_token_id=98,
                       audio_eos_token_id=97, codebook_pad_token_id=63, codebook_eos_token_id=0,
                       depth_decoder_config=depth, codec_config=codec.to_dict())
    yield CsmForConditionalGeneration(config).eval()
    torch.set_num_threads(threads)


def engine(model, **overrides) -> CsmEngine:
    options = dict(voice_name="tiny", max_audio_seconds=2.0, seconds_per_char=1.0, first_chunk_frames=2,
                   chunk_frames=3)
    return CsmEngine(model, tokenize, **(options | overrides))


def count_frames(csm: CsmEngine) -> list[int]:
    """Counts the frames the engine computes (each is a backbone + depth decoder step)."""
    made = [0]
    step = csm._next_frame

    def counted(hidden):
        made[0] += 1
        return step(hidden)

    csm._next_frame = counted
    return made


def test_audio_streams_in_chunks_of_whole_frames(model):
    csm = engine(model)
    assert csm.sample_rate == 24000
    torch.manual_seed(1)
    chunks = list(csm.synthesize(TEXT, 1.0))
    assert all(c.dtype == np.int16 and c.ndim == 1 for c in chunks)
    assert len(chunks) > 2, "audio must leave in several chunks, not at the end"
    assert len(chunks[0]) == 2 * HOP
    assert all(len(c) == 3 * HOP for c in chunks[1:-1])
    assert 0 < len(chunks[-1]) <= 3 * HOP and len(chunks[-1]) % HOP == 0
    assert sum(len(c) for c in chunks) == csm.max_frames * HOP  # a random model never says end of audio


def test_streamed_decode_equals_one_decode_of_the_whole_utterance(model):
    csm = engine(model)
    torch.manual_seed(2)
    codes = torch.stack(list(csm.frames(TEXT)), dim=-1)  # (1, codebooks, frames)
    assert codes.shape[:2] == (1, CODEBOOKS) and codes.shape[-1] == csm.max_frames
    with torch.inference_mode():
        whole = model.codec_model.decode(codes).audio_values[0, 0]
        stream = MimiStream(model.codec_model)
        sizes = [1, 2, 3, 5, 1, 4]
        streamed, start = [], 0
        while start < codes.shape[-1]:
            size = sizes[len(streamed) % len(sizes)]
            streamed.append(stream.decode(codes[..., start:start + size]))
            start += size
        streamed = torch.cat(streamed)
        naive = torch.cat([model.codec_model.decode(codes[..., i:i + 3]).audio_values[0, 0]
                           for i in range(0, codes.shape[-1], 3)])
    scale = whole.abs().max().item()
    assert scale > 1e-3, "the random codec must make a signal for this comparison to mean anything"
    assert (streamed - whole).abs().max().item() <= 1e-5 * scale
    assert (naive - whole).abs().max().item() > 1e-2 * scale, "decoding chunks without context is not exact"

    torch.manual_seed(2)
    pcm = np.concatenate(list(csm.synthesize(TEXT, 1.0)))
    expected = (whole.clamp(-1, 1) * 32767).round().numpy()
    assert np.abs(pcm.astype(np.int32) - expected).max() <= 1


def test_closing_the_stream_stops_the_frame_loop(model):
    csm = engine(model)
    made = count_frames(csm)
    chunks = csm.synthesize(TEXT, 1.0)
    first = next(chunks)
    assert len(first) == 2 * HOP and made[0] == 2
    chunks.close()  # what the Triton model does when the client cancels
    assert made[0] == 2
    assert made[0] < csm.max_frames


def test_cancel_is_seen_within_a_frame(model):
    csm = engine(model)
    made = count_frames(csm)
    chunks = list(csm.synthesize(TEXT, 1.0, is_cancelled=lambda: made[0] >= 4))  # cancelled in the second chunk
    assert made[0] == 4, "no frame is computed after the cancel is seen"
    assert sum(len(c) for c in chunks) == 2 * HOP, "the frames of an unfinished chunk are not decoded"


def test_end_of_audio_frame_ends_the_utterance(model):
    """Force the model to answer the all-zero end-of-audio frame after 7 frames."""
    csm = engine(model)
    made = count_frames(csm)

    def end_after_seven(module, inputs, logits):
        if made[0] > 7:
            logits = torch.full_like(logits, -1e4)
            logits[..., 0] = 1e4
        return logits

    hooks = [model.lm_head.register_forward_hook(end_after_seven),
             model.depth_decoder.codebooks_head.register_forward_hook(end_after_seven)]
    try:
        chunks = list(csm.synthesize(TEXT, 1.0))
    finally:
        for hook in hooks:
            hook.remove()
    assert made[0] == 8  # seven frames of audio and the end-of-audio frame
    assert sum(len(c) for c in chunks) == 7 * HOP


def test_length_limit_follows_the_text(model):
    csm = engine(model, max_audio_seconds=60.0, seconds_per_char=0.1)
    frames = list(csm.frames("Hi."))
    assert len(frames) == round((1.0 + 0.1 * 3) * 12.5)


def test_voice_prompt_is_prefilled_once_and_reused(model):
    rng = np.random.default_rng(0)
    prompt = ("a few words in the voice", (0.1 * rng.standard_normal(HOP * 6)).astype(np.float32))
    csm = engine(model, voice_prompt=prompt)
    prefix = csm._prefix.get_seq_length()
    assert prefix == len(tokenize("[0]" + prompt[0])) + 6 + 1  # text, six audio frames, end of audio
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(torch.cat(list(csm.frames(TEXT))))
    assert csm._prefix.get_seq_length() == prefix, "an utterance must not grow the shared prompt cache"
    assert torch.equal(runs[0], runs[1])
    torch.manual_seed(3)
    assert not torch.equal(torch.cat(list(engine(model).frames(TEXT))), runs[0]), "the prompt conditions the frames"


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    """The tiny model saved like a hub snapshot: weights, a character tokenizer, and a 16 kHz voice prompt."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from tests.speech import write_wav

    path = tmp_path_factory.mktemp("csm-tiny")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{chr(c): 3 + i for i, c in enumerate(range(32, 127))}}
    characters = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    characters.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    characters.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                              special_tokens=[("<s>", 1), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=characters, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    model.save_pretrained(path)
    (path / "prompts").mkdir()
    tone = (3000 * np.sin(np.arange(8000) * 2 * np.pi * 220 / 16000)).astype(np.int16)  # 0.5 s at 16 kHz
    write_wav(path / "prompts" / "voice.wav", tone, 16000)
    return path


def test_engine_loads_from_config_parameters(model_dir):
    params = {"model": str(model_dir), "device": "cpu", "dtype": "float32", "speaker": "1", "voice": "tiny-voice",
              "voice_prompt_audio": "prompts/voice.wav", "voice_prompt_text": "a tone", "max_audio_seconds": "0.8",
              "first_chunk_frames": "1", "chunk_frames": "2"}
    csm = CsmEngine.from_params(params)
    assert (csm.voice_name, csm.speaker, csm.sample_rate, csm.max_frames) == ("tiny-voice", 1, 24000, 10)
    assert csm._prefix.get_seq_length() == len("[1]a tone") + 2 + 7 + 1  # text, <s> </s>, 0.5 s (7 frames), end
    chunks = list(csm.synthesize("Hello.", 1.0))
    assert [len(c) for c in chunks] == [HOP] + [2 * HOP] * 4 + [HOP]

    with pytest.raises(ValueError, match="dtype"):
        CsmEngine.from_params(params | {"dtype": "int8"})
    with pytest.raises(ValueError, match="voice_prompt_text"):
        CsmEngine.from_params(params | {"voice_prompt_text": ""})
