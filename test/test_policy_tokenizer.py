"""The offline instruction tokenizer."""
import pytest

from qvla_ros.policy import InstructionTokenizer

SENTENCES = ["Pull the drawer open", "push the drawer close", "Turn the faucet left.", "Slide the window open"]


def test_round_trip_of_known_sentences():
    tok = InstructionTokenizer.train(SENTENCES)
    ids, mask = tok.encode(SENTENCES, max_tokens=8)
    for row, text in enumerate(SENTENCES):
        assert tok.decode(ids[row].tolist()) == " ".join(tok.tokenize(text))
        assert tok.tokenize(text) == text.lower().replace(".", " .").split()
        assert int(mask[row].sum()) == len(tok.tokenize(text))
    assert (ids[~mask] == tok.pad_id).all()
    assert tok.unk_id not in ids.tolist()


def test_unknown_words_truncation_and_serialization():
    tok = InstructionTokenizer.train(SENTENCES)
    ids, mask = tok.encode(["open the refrigerator"], max_tokens=2)
    assert ids.shape == (1, 2) and mask.all()  # truncated to the first two words, both known
    assert tok.unk_id not in ids.tolist()
    ids, mask = tok.encode(["open the refrigerator"], max_tokens=4)
    assert ids[0, 2] == tok.unk_id and mask[0].tolist() == [True, True, True, False]
    again = InstructionTokenizer.from_str(tok.to_str())
    assert again.encode(SENTENCES, 8)[0].equal(tok.encode(SENTENCES, 8)[0])
    # The vocabulary depends on the set of words, not on the order they were seen in.
    assert InstructionTokenizer.train(SENTENCES[::-1]).to_str() == tok.to_str()


def test_bad_tokenizer_input():
    tok = InstructionTokenizer.train(SENTENCES)
    with pytest.raises(ValueError, match="list of strings"):
        tok.encode("pull the drawer open", 8)
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        InstructionTokenizer.from_str("{}")
    with pytest.raises(ValueError, match="strings"):
        InstructionTokenizer.train([3])
