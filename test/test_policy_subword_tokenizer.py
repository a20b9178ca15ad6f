"""The subword (BPE) tokenizer trained for the small OFT presets (processing_oft.train_subword_tokenizer):
OFT's special ids where the configuration puts them, direction words kept apart, unseen words
spelled in known pieces rather than one unknown token, and tokenizer.json round trips."""
import pytest

from qvla_ros.policy.configuration_oft import get_oft_config
from qvla_ros.policy.phrasings import TRAINING_PHRASINGS, all_training_texts
from qvla_ros.policy.processing_oft import OFTTokenizer, train_subword_tokenizer
from qvla_ros.policy.processing_vla import DEFAULT_INSTRUCTIONS


@pytest.fixture(scope="module")
def tok():
    return train_subword_tokenizer(all_training_texts(list(DEFAULT_INSTRUCTIONS), TRAINING_PHRASINGS),
                                   get_oft_config("oft-small"))


def pieces(tok, text):
    return [tok._tok.id_to_token(i) for i in tok.prompt_ids(text)]


def test_special_ids_and_a_small_vocabulary(tok):
    cfg = tok.config
    assert tok.vocab_size <= cfg.vocab_size == 512
    ids = tok.prompt_ids("pull the drawer open")
    assert ids[0] == cfg.bos_id and ids[-1] == cfg.empty_id
    assert 0 not in ids   # <unk>


def test_on_and_off_tokenize_differently(tok):
    on, off = tok.prompt_ids("turn the faucet on"), tok.prompt_ids("turn the faucet off")
    assert on != off
    ids, mask = tok.encode(["turn the faucet on", "turn the faucet off"], tok.config.max_text_tokens)
    assert not ids[0].equal(ids[1])


def test_an_unseen_word_is_spelled_in_known_pieces(tok):
    for word in ("shut", "rotate", "zyxwvut"):
        assert word not in " ".join(all_training_texts(list(DEFAULT_INSTRUCTIONS), TRAINING_PHRASINGS))
        ids = tok.prompt_ids(f"{word} the drawer")
        assert 0 not in ids, word                         # no <unk>
        got = pieces(tok, f"{word} the drawer")
        start = got.index("\u2581to") + 1
        spelled = got[start:got.index("\u2581the", start)]
        assert len(spelled) >= 2 and "".join(spelled).lstrip("\u2581") == word, spelled
    # Different unseen words stay different (a word-level vocabulary makes them both [UNK]).
    assert tok.prompt_ids("shut the door") != tok.prompt_ids("swing the door")


def test_tokenizer_json_round_trip_and_refusals(tok):
    again = OFTTokenizer.from_str(tok.to_str(), tok.config)
    for text in ("rotate the tap to the left", "pull the drawer open"):
        assert again.prompt_ids(text) == tok.prompt_ids(text)
    with pytest.raises(ValueError, match="ids 0-4"):
        train_subword_tokenizer(["pull the drawer open"], get_oft_config("oft-7b"))
    with pytest.raises(ValueError, match="vocab_size"):
        train_subword_tokenizer(["pull the drawer open"], get_oft_config("oft-small"), vocab_size=4096)
