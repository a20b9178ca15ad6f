"""Training phrasings (qvla_ros/policy/phrasings.py): one list per suite task, none of the
robustness test's held-out phrasings (or the words they bring) among them, and the table that
draws them for training batches."""
import re

import torch

from qvla_ros.policy.phrasings import TRAINING_PHRASINGS, PhrasingTable, all_training_texts
from qvla_ros.policy.processing_vla import InstructionTokenizer
from qvla_ros.sim.perturb import HELD_OUT_INSTRUCTIONS
from qvla_ros.sim.suite import TASKS


def words(text):
    return set(re.findall(r"[a-z]+", text.lower()))


def norm(text):
    return " ".join(text.lower().split())


def test_every_suite_task_has_several_phrasings_its_own_sentence_first():
    assert set(TRAINING_PHRASINGS) == {t.instruction for t in TASKS}
    for spec in TASKS:
        options = TRAINING_PHRASINGS[spec.instruction]
        assert options[0] == spec.instruction and len(options) >= 4
        assert len({norm(p) for p in options}) == len(options), spec.name


def test_no_phrasing_belongs_to_two_tasks():
    # The faucet pair must stay apart: "turn the faucet on" trains one task only.
    seen = {}
    for canonical, options in TRAINING_PHRASINGS.items():
        for p in options:
            assert norm(p) not in seen, (p, seen.get(norm(p)), canonical)
            seen[norm(p)] = canonical


def test_training_phrasings_and_held_out_phrasings_are_disjoint():
    training = {norm(p) for options in TRAINING_PHRASINGS.values() for p in options}
    held_out = {norm(p) for p in HELD_OUT_INSTRUCTIONS.values()}
    assert not training & held_out
    # Nor does training use a word the held-out phrasings bring beyond the suite's own sentences
    # ("shut", "rotate", "tap", ...): the robustness test stays a test of unseen words.
    suite_words = set().union(*(words(t.instruction) for t in TASKS))
    new_words = set().union(*(words(p) for p in HELD_OUT_INSTRUCTIONS.values())) - suite_words
    assert {"shut", "rotate", "tap", "swing", "lift", "press", "drag"} <= new_words
    for options in TRAINING_PHRASINGS.values():
        for p in options:
            assert not words(p) & new_words, p


def test_the_table_draws_each_phrasing_and_validation_reads_the_own_sentence():
    instructions = ["turn the faucet left", "an instruction without a list"]
    tok = InstructionTokenizer.train(all_training_texts(instructions, TRAINING_PHRASINGS))
    table = PhrasingTable(instructions, tok, 12, TRAINING_PHRASINGS)
    assert table.texts[0] == "turn the faucet left" and table.texts[-1] == "an instruction without a list"
    instr = torch.tensor([0] * 600 + [1] * 10)
    ids, mask = table.sample(instr, torch.Generator().manual_seed(0))
    drawn = {tok.decode(row[m].tolist()) for row, m in zip(ids[:600], mask[:600])}
    assert drawn == {" ".join(tok.tokenize(p)) for p in TRAINING_PHRASINGS["turn the faucet left"]}
    assert {tok.decode(row[m].tolist()) for row, m in zip(ids[600:], mask[600:])} == {"an instruction without a list"}
    ids, mask = table.canonical(torch.tensor([0, 1]))
    assert tok.decode(ids[0][mask[0]].tolist()) == "turn the faucet left"
    # The same generator state draws the same phrasings (a resumed run continues the sequence).
    a = table.sample(instr, torch.Generator().manual_seed(5))[0]
    assert torch.equal(a, table.sample(instr, torch.Generator().manual_seed(5))[0])
