import logging

import numpy as np
import pytest

from pi_build.model.tokenizer import (
    BOS_ID,
    LIBERO_INSTRUCTIONS,
    PromptTokenizer,
    clean_prompt,
    discretize_state,
    train_tiny_tokenizer,
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model")


def pieces(tok: PromptTokenizer, ids) -> list[str]:
    return [tok.processor.id_to_piece(int(i)) for i in ids]


def test_tiny_tokenizer_has_paligemma_special_ids_and_is_deterministic(model_path, tmp_path):
    tok = PromptTokenizer(model_path, max_len=8)
    assert pieces(tok, range(4)) == ["<pad>", "</s>", "<s>", "<unk>"]
    assert tok.processor.bos_id() == 2 and tok.processor.eos_id() == 1
    assert tok.processor.pad_id() == 0 and tok.processor.unk_id() == 3
    assert tok.vocab_size <= 512
    again = train_tiny_tokenizer(tmp_path / "sub" / "again.model")
    assert again.read_bytes() == model_path.read_bytes()
    assert sorted(p.name for p in again.parent.iterdir()) == ["again.model"]  # no temp file left


def test_pi0_format_bos_text_newline_then_padding(model_path):
    tok = PromptTokenizer(model_path, max_len=16)
    tokens, mask = tok.tokenize("  pick_up the\nbowl ")
    n = int(mask.sum())
    assert tokens.dtype == np.int64 and mask.dtype == bool and tokens.shape == mask.shape == (16,)
    assert mask[:n].all() and not mask[n:].any()
    assert (tokens[n:] == 0).all()
    assert tokens[0] == BOS_ID
    # the text, cleaned: stripped, '_' and '\n' turned into spaces; then "\n" on its own
    assert "".join(pieces(tok, tokens[1 : n - 1])) == "pick▁up▁the▁bowl"
    assert pieces(tok, tokens[n - 1 : n]) == ["\n"]
    assert tokens[1 : n - 1].tolist() == tok.processor.encode("pick up the bowl")


def test_pi05_format_with_discrete_state(model_path):
    tok = PromptTokenizer(model_path, max_len=200)
    state = np.array([-1.0, 0.0, 0.999, 1.0, -1.5])
    tokens, mask = tok.tokenize("pick up the bowl\n", state)
    n = int(mask.sum())
    assert tokens[0] == BOS_ID
    assert tok.processor.decode(tokens[1:n].tolist()) == "Task: pick up the bowl, State: 0 128 255 255 -1;\nAction: "
    assert pieces(tok, tokens[:n]).count("\n") == 1
    assert (tokens[n:] == 0).all() and not mask[n:].any()


def test_discretize_state_hand_values():
    values = np.array([-1.0, -0.99, 0.0, 0.5, 0.999, 1.0, 1 - 1 / 128, 1 - 1 / 128 - 1e-9, -1.5, 3.0])
    assert discretize_state(values).tolist() == [0, 1, 128, 192, 255, 255, 255, 254, -1, 255]


def test_clean_prompt():
    assert clean_prompt("\n put_the bowl\non the_plate  ") == "put the bowl on the plate"


def test_truncation_keeps_first_tokens_and_warns(model_path, caplog):
    long_prompt = LIBERO_INSTRUCTIONS[0]
    full = PromptTokenizer(model_path, max_len=200).token_ids(long_prompt)
    tok = PromptTokenizer(model_path, max_len=5)
    with caplog.at_level(logging.WARNING, logger="pi_build.model.tokenizer"):
        tokens, mask = tok.tokenize(long_prompt)
    assert tokens.tolist() == full[:5] and mask.all()
    assert "truncating" in caplog.text and str(len(full)) in caplog.text


def test_exact_fit_does_not_warn(model_path, caplog):
    n = len(PromptTokenizer(model_path, max_len=200).token_ids("open the drawer"))
    with caplog.at_level(logging.WARNING, logger="pi_build.model.tokenizer"):
        tokens, mask = PromptTokenizer(model_path, max_len=n).tokenize("open the drawer")
    assert mask.all() and tokens[-1] != 0 and caplog.text == ""


def test_all_libero_prompts_fit_the_tiny_vocab(model_path):
    tok = PromptTokenizer(model_path, max_len=200)
    rng = np.random.default_rng(0)
    for text in LIBERO_INSTRUCTIONS:
        tokens, mask = tok.tokenize(text, rng.uniform(-1.2, 1.2, size=8))
        assert tokens.max() < 512 and tokens[mask].min() >= 1
        assert 3 not in tokens[mask]  # no unknown pieces


def test_missing_model_file_names_the_file(tmp_path):
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        PromptTokenizer(path, max_len=48)


def test_corrupt_model_file_names_the_file(tmp_path):
    path = tmp_path / "corrupt.model"
    path.write_bytes(np.random.default_rng(1).bytes(300))
    with pytest.raises(ValueError, match="corrupt.model"):
        PromptTokenizer(path, max_len=48)


def test_state_in_prompt_must_be_1d(model_path):
    with pytest.raises(ValueError, match="1-D"):
        PromptTokenizer(model_path, max_len=48).tokenize("go", np.random.default_rng(2).uniform(-1, 1, (2, 3)))
