"""Cut the LLM's streamed text into clauses that TTS can speak while the rest is still being written.

The first clause is cut as early as reads naturally (a comma after a few
words), because time to first audio is what the caller waits for; later ones
at sentence ends, which sound better and still stay ahead of playback.
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…]+[\"')\]]*\s")
_ENDS_SENTENCE = re.compile(r"[.!?…]+[\"')\]]*$")
_CLAUSE_END = re.compile(r"[,;:—–]\s")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_MARKUP = re.compile(r"[*_#`~<>|\[\]{}\\/]+")


def speakable(text: str) -> str:
    """Text as a voice should say it: no markdown, emoji or stray whitespace."""
    text = _MARKUP.sub(" ", _LINK.sub(r"\1", text))
    text = "".join(ch for ch in text if ch.isprintable() and not 0x1F000 <= ord(ch) <= 0x1FAFF)
    return " ".join(text.split())


def ends_sentence(clause: str) -> bool:
    """True when a clause closes its sentence (what the speaker may stop after without breaking off)."""
    return bool(_ENDS_SENTENCE.search(clause))


class ClauseChunker:
    """Feed deltas with `push()`, collect complete clauses; `flush()` returns the rest at the end."""

    def __init__(self, first_min_words: int = 2, first_max_words: int = 6, min_words: int = 6, max_chars: int = 240):
        self.first_min_words, self.first_max_words = first_min_words, first_max_words
        self.min_words, self.max_chars = min_words, max_chars
        self._buffer = ""
        self._emitted = 0

    def push(self, delta: str) -> list[str]:
        self._buffer += delta
        out = []
        while (clause := self._cut()) is not None:
            out.append(clause)
        return out

    def flush(self) -> list[str]:
        rest, self._buffer = speakable(self._buffer), ""
        return [rest] if rest else []

    def _cut(self) -> str | None:
        buffer = self._buffer
        end = None
        sentence = _SENTENCE_END.search(buffer)
        if sentence:
            end = sentence.end()
        else:
            min_words = self.first_min_words if self._emitted == 0 else self.min_words
            for m in _CLAUSE_END.finditer(buffer):
                if len(buffer[:m.end()].split()) >= min_words:
                    end = m.end()
                    break
        if end is None and self._emitted == 0:
            # no punctuation yet: the first clause goes at a word boundary, the caller is waiting
            spans = list(re.finditer(r"\S+\s", buffer))
            if len(spans) >= self.first_max_words:
                end = spans[self.first_max_words - 1].end()
        if end is None and len(buffer) > self.max_chars:
            cut = buffer.rfind(" ", 0, self.max_chars)
            end = cut + 1 if cut > 0 else self.max_chars
        if end is None:
            return None
        clause, self._buffer = speakable(buffer[:end]), buffer[end:]
        if not clause:
            return self._cut() if self._buffer else None
        self._emitted += 1
        return clause
