"""Text conditioning for training batches: encoded once per caption, kept in an LRU in memory,
and (with cache_text_embeddings) precomputed for every caption and kept on disk.

When text-encoder networks train (train.train_text_encoder), every batch is encoded afresh with
gradients and nothing is kept: the embeddings change with every step. The trained encoders are in
train mode only while they encode (network dropout); previews and everything else see them in
eval mode.

With train.unload_text_encoder (ai-toolkit's low-memory mode) the trigger word, the blank prompt and
the preview prompts are encoded once and kept; training samples are then conditioned on the trigger
word (regularisation samples on the blank prompt) whatever their captions say."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from aitk.models.base import ModelAdapter, PromptEmbeds

# Small datasets never re-encode a caption, while a large one with unique captions cannot grow
# memory without bound.
LRU_SIZE = 512
BLANK_PROMPT = ""


def _to_tensors(embeds: PromptEmbeds) -> dict[str, torch.Tensor]:
    return {"hidden_states": embeds.hidden_states, **{f"extra.{k}": v for k, v in embeds.extra.items()}}


def _from_tensors(tensors: dict[str, torch.Tensor]) -> PromptEmbeds:
    extra = {k.removeprefix("extra."): v for k, v in tensors.items() if k.startswith("extra.")}
    return PromptEmbeds(tensors["hidden_states"], extra)


class PromptConditioner:
    """`encoding`: a context the text encoders run in (brings parked encoders to the device)."""

    def __init__(
        self,
        adapter: ModelAdapter,
        text_cache: Any | None = None,
        encoding: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> None:
        self.adapter = adapter
        self.text_cache = text_cache  # aitk.data.text_cache.TextEmbeddingCache or None
        self.encoding = encoding
        self._lru: OrderedDict[str, PromptEmbeds] = OrderedDict()
        self.trained_encoders: list[torch.nn.Module] = []  # set by `train_text_encoders`
        self._kept: dict[str, PromptEmbeds] = {}  # encoded by `use_fixed_prompts`, never evicted
        self.fixed_prompt: str | None = None  # unload_text_encoder: every training sample's prompt
        self.encoders_released = False  # nothing can be encoded any more (set once they are freed)

    def train_text_encoders(self, encoders: list[torch.nn.Module]) -> None:
        """From now on encode with gradients through `encoders` (their networks train)."""
        if encoders and self.text_cache is not None:
            raise ValueError("cached text embeddings cannot train the text encoder")
        self.trained_encoders = list(encoders)
        self._lru.clear()

    def use_fixed_prompts(self, trigger_word: str | None, keep: list[str]) -> None:
        """unload_text_encoder: from now on `for_batch` conditions every training sample on
        `trigger_word` (on the blank prompt when there is none, and for regularisation samples).
        Those and `keep` (the preview prompts) are encoded now, one per call as `__call__` does,
        and kept for good: the text encoders go after this."""
        self.fixed_prompt = trigger_word or BLANK_PROMPT
        with self.encoding(), torch.no_grad():
            for prompt in dict.fromkeys([BLANK_PROMPT, self.fixed_prompt, *keep]):
                if prompt not in self._kept:
                    self._kept[prompt] = self.adapter.encode_prompts([prompt])

    def for_batch(self, captions: list[str], is_reg: torch.Tensor | None = None) -> PromptEmbeds:
        """A training batch's conditioning: its captions', or with fixed prompts (see
        `use_fixed_prompts`) the trigger word's, and the blank prompt's for `is_reg` samples."""
        if self.fixed_prompt is None:
            return self(captions)
        regs = [bool(r) for r in is_reg] if is_reg is not None else [False] * len(captions)
        return self([BLANK_PROMPT if reg else self.fixed_prompt for reg in regs])

    def precompute(self, captions: list[str], progress: Callable[[int], None] | None = None) -> int:
        """Encode every caption the text cache lacks; returns how many were encoded."""
        assert self.text_cache is not None
        missing = self.text_cache.missing(captions)
        if not missing:
            return 0
        with self.encoding(), torch.no_grad():
            for caption in missing:  # one per call, exactly as __call__ encodes (see there)
                single = self.adapter.encode_prompts([caption])
                self.text_cache.put(caption, {k: v.cpu() for k, v in _to_tensors(single).items()})
                if progress is not None:
                    progress(1)
        return len(missing)

    def _lookup(self, caption: str) -> PromptEmbeds | None:
        if caption in self._kept:
            return self._kept[caption]
        if caption in self._lru:
            self._lru.move_to_end(caption)
            return self._lru[caption]
        if self.text_cache is not None:
            tensors = self.text_cache.get(caption)
            if tensors is not None:
                return _from_tensors(tensors).to(self.adapter.device)
        return None

    def _encode_trained(self, captions: list[str]) -> PromptEmbeds:
        """Every caption through the training text encoders, with gradients, nothing kept."""
        unique = list(dict.fromkeys(captions))
        for encoder in self.trained_encoders:
            encoder.train()
        try:
            with self.encoding():
                found = {caption: self.adapter.encode_prompts([caption]) for caption in unique}
        finally:
            for encoder in self.trained_encoders:
                encoder.eval()
        return PromptEmbeds.cat([found[caption] for caption in captions])

    def __call__(self, captions: list[str]) -> PromptEmbeds:
        if self.trained_encoders:
            return self._encode_trained(captions)
        with torch.no_grad():
            return self._frozen(captions)

    def _frozen(self, captions: list[str]) -> PromptEmbeds:
        found = {caption: self._lookup(caption) for caption in dict.fromkeys(captions)}
        missing = [caption for caption, embeds in found.items() if embeds is None]
        # One caption per call: batched matmuls give slightly different rows for different batch
        # sizes, and which captions are uncached differs after a resume, so a resumed run would drift.
        if missing and self.encoders_released:
            raise RuntimeError(
                f"the text encoders are released, yet {missing[0]!r} was not encoded before they went "
                "(every prompt a step or a preview uses is encoded at set-up; this is a bug)"
            )
        if missing:
            with self.encoding():
                for caption in missing:
                    found[caption] = self.adapter.encode_prompts([caption])
        for caption, embeds in found.items():
            if caption in self._kept:
                continue
            self._lru[caption] = embeds
            self._lru.move_to_end(caption)
        while len(self._lru) > LRU_SIZE:
            self._lru.popitem(last=False)
        return PromptEmbeds.cat([found[caption] for caption in captions])
