"""Prompt tokenization for pi0 / pi0.5, the way openpi's ``PaligemmaTokenizer`` does it.

The tokenizer is PaliGemma's sentencepiece model, read from a ``.model`` file the user gives
(pi-build never downloads it). Two prompt formats exist (openpi ``src/openpi/models/tokenizer.py``):

    pi0, or pi0.5 without discrete state:  <bos> + tokens(text) + tokens("\\n")
    pi0.5 with discrete state:             <bos> + tokens("Task: {text}, State: {bins};\\nAction: ")

``text`` is the prompt stripped, with '_' and newlines turned into spaces. ``bins`` is the
*normalized* state (quantile-normalized for pi0.5, not clipped, not padded to 32 dims: openpi's
TokenizePrompt runs after Normalize and before PadStatesAndActions) put into 256 bins on [-1, 1]
and written as space-separated integers. Tokens are padded with id 0 (mask False) to ``max_len``.
A longer prompt is truncated with a warning, as openpi does, or refused with an ``InputError``
when the tokenizer is made with ``truncate=False`` (the runtime's choice: a robot's instruction
silently cut in half is worse than an error its client sees).

Whether a pi0.5 checkpoint reads the discrete state is a training choice: openpi defaults it to
on for pi0.5, but its ``pi05_libero`` config turns it off (the state then reaches the model nowhere).

``train_tiny_tokenizer`` makes a small sentencepiece model with PaliGemma's special ids, for the
tiny test/demo configs (vocab 512).
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import sentencepiece

from pi_build.errors import InputError
from pi_build.io import atomic_write

logger = logging.getLogger(__name__)

# PaliGemma's special token ids (the tiny tokenizer uses the same ones).
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
STATE_BINS = 256


def clean_prompt(prompt: str) -> str:
    return prompt.strip().replace("_", " ").replace("\n", " ")


def discretize_state(state: np.ndarray) -> np.ndarray:
    """Bin indices of a normalized state: 256 equal bins on [-1, 1], as openpi does.

    Bin i covers [-1 + i/128, -1 + (i+1)/128); values >= 1 - 1/128 land in 255. Values below -1
    are not clipped by openpi and give -1, which is kept here so the prompt matches.
    """
    edges = np.linspace(-1.0, 1.0, STATE_BINS + 1)[:-1]
    return np.digitize(np.asarray(state), bins=edges) - 1


class PromptTokenizer:
    """PaliGemma's sentencepiece model with openpi's prompt formats, padded to ``max_len``."""

    def __init__(self, model_path: str | os.PathLike, max_len: int, *, truncate: bool = True):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path} (expected PaliGemma's sentencepiece .model)")
        processor = sentencepiece.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a valid sentencepiece model: {e}") from e
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.path = path
        self.max_len = max_len
        self.truncate = truncate  # False: refuse an over-long prompt instead of cutting it
        self.processor = processor

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def token_ids(self, prompt: str, state: np.ndarray | None = None) -> list[int]:
        """The unpadded token ids: pi0 format without ``state``, pi0.5 discrete-state format with it."""
        text = clean_prompt(prompt)
        if state is None:
            # "\n" is tokenized on its own: the "start of answer" token.
            return self.processor.encode(text, add_bos=True) + self.processor.encode("\n")
        state = np.asarray(state)
        if state.ndim != 1:
            raise ValueError(f"the state to put in the prompt must be 1-D, got shape {state.shape}")
        bins = " ".join(str(b) for b in discretize_state(state))
        return self.processor.encode(f"Task: {text}, State: {bins};\nAction: ", add_bos=True)

    def tokenize(self, prompt: str, state: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """int64 tokens [max_len] and bool mask [max_len] (True = real token)."""
        ids = self.token_ids(prompt, state)
        if len(ids) > self.max_len and not self.truncate:
            raise InputError(
                f"prompt too long: its {len(prompt)} characters make {len(ids)} tokens, more than the "
                f"{self.max_len} these engines take (recipe model.prompt_len); send a shorter prompt"
            )
        if len(ids) > self.max_len:
            logger.warning(
                "prompt is %d tokens, more than max_len %d: truncating (raise max_token_len if this is frequent)",
                len(ids),
                self.max_len,
            )
            ids = ids[: self.max_len]
        n = len(ids)
        tokens = np.full(self.max_len, PAD_ID, dtype=np.int64)
        tokens[:n] = ids
        mask = np.arange(self.max_len) < n
        return tokens, mask


# ----------------------------------------------------------------------------- tiny tokenizer

# The LIBERO task instructions (four suites), the prompts the tiny demo model sees.
LIBERO_INSTRUCTIONS = (
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
    "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
    "pick up the black bowl on the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the black bowl next to the plate and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
    "pick up the alphabet soup and place it in the basket",
    "pick up the cream cheese and place it in the basket",
    "pick up the salad dressing and place it in the basket",
    "pick up the bbq sauce and place it in the basket",
    "pick up the ketchup and place it in the basket",
    "pick up the tomato sauce and place it in the basket",
    "pick up the butter and place it in the basket",
    "pick up the milk and place it in the basket",
    "pick up the chocolate pudding and place it in the basket",
    "pick up the orange juice and place it in the basket",
    "open the middle drawer of the cabinet",
    "put the bowl on the stove",
    "put the wine bottle on top of the cabinet",
    "open the top drawer and put the bowl inside",
    "put the bowl on top of the cabinet",
    "push the plate to the front of the stove",
    "put the cream cheese in the bowl",
    "turn on the stove",
    "put the bowl on the plate",
    "put the wine bottle on the rack",
    "put both the alphabet soup and the tomato sauce in the basket",
    "put both the cream cheese box and the butter in the basket",
    "turn on the stove and put the moka pot on it",
    "put the black bowl in the bottom drawer of the cabinet and close it",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "pick up the book and place it in the back compartment of the caddy",
    "put the white mug on the plate and put the chocolate pudding to the right of the plate",
    "put both the alphabet soup and the cream cheese box in the basket",
    "put both moka pots on the stove",
    "put the yellow and white mug in the microwave and close it",
)


def _tiny_corpus() -> list[str]:
    """Instructions in both prompt formats, plus every state bin number; fixed, so training is deterministic."""
    lines = [" ".join(str(b) for b in range(STATE_BINS))]
    for i, text in enumerate(LIBERO_INSTRUCTIONS):
        bins = " ".join(str((i * 37 + 11 * k) % STATE_BINS) for k in range(8))
        lines += [text, f"Task: {text}, State: {bins};\nAction: "]
    return lines


def train_tiny_tokenizer(out_path: str | os.PathLike, vocab_size: int = 512) -> Path:
    """Train a small BPE sentencepiece model on a built-in robot-instruction corpus; write it atomically.

    Special ids are PaliGemma's (pad 0, eos 1, bos 2, unk 3); "\\n" is one piece, digits are split
    and unknown characters fall back to bytes, as in PaliGemma's tokenizer. ``vocab_size`` is an
    upper bound (the corpus may support fewer pieces), so every id stays below it.
    """
    out_path = Path(out_path)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_tiny_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        byte_fallback=True,
        user_defined_symbols=["\n"],
        num_threads=1,
        minloglevel=2,
    )
    return atomic_write(out_path, model.getvalue())
