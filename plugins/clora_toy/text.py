"""An offline text encoder: hashed words into a frozen, seeded random CLIP text transformer."""

from __future__ import annotations

import hashlib
import re

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from clora_toy.config import ModelConfig

PAD_ID = 0
# Not 2: CLIPTextModel pools by argmax(token id) when eos_token_id == 2, which collapses prompts.
EOS_ID = 1
_FIRST_WORD_ID = 2
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class HashTokenizer:
    """Word-level tokenizer: every lowercase word hashes to a stable id, so any word encodes."""

    def __init__(self, vocab_size: int, max_words: int) -> None:
        self.vocab_size = vocab_size
        self.max_words = max_words

    def word_id(self, word: str) -> int:
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        return _FIRST_WORD_ID + int.from_bytes(digest, "little") % (self.vocab_size - _FIRST_WORD_ID)

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids ``[B, L]`` (words then EOS, right-padded) and the 0/1 mask."""
        rows = [
            [*[self.word_id(w) for w in _WORD.findall(p.lower())][: self.max_words], EOS_ID] for p in prompts
        ]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask


def build_text_encoder(cfg: ModelConfig) -> CLIPTextModel:
    """The frozen random text encoder; weights depend only on ``cfg`` (seeded init)."""
    config = CLIPTextConfig(
        vocab_size=cfg.text_vocab,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 2,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=max(1, cfg.text_hidden // 32),
        max_position_embeddings=cfg.text_max_words + 2,
        pad_token_id=PAD_ID,
        bos_token_id=PAD_ID,
        eos_token_id=EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 7919)
        model = CLIPTextModel(config)
        # The default init (std 0.02) makes every word embedding nearly the same after layer norm;
        # unit-scale embeddings keep different words clearly apart.
        embeddings = model.get_input_embeddings()
        assert isinstance(embeddings, torch.nn.Embedding)
        torch.nn.init.normal_(embeddings.weight, std=1.0)
    model.requires_grad_(False)
    return model.eval()
