"""Robustness perturbations: what they do to an observation, how they are spelled, and that a
perturbed evaluation runs the same episodes as the plain one (so the two pair)."""
import numpy as np
import pytest
import torch

from qvla_ros.sim.evaluate import evaluate
from qvla_ros.sim.paired import outcomes_of, pair_outcomes
from qvla_ros.sim.perturb import HELD_OUT_INSTRUCTIONS, Perturbation, PerturbedPolicy
from qvla_ros.sim.suite import resolve_tasks


def test_spelling():
    assert Perturbation.parse(None) is None and Perturbation.parse("") is None
    assert Perturbation.parse("brightness=1.2, shift=-2,rephrase") == Perturbation(1.2, -2, True)
    for bad in ("brightness", "shift=1.5", "rephrase=yes", "blur=3", "brightness=0", "shift=40"):
        with pytest.raises(ValueError, match="perturbation|brightness|shift"):
            Perturbation.parse(bad)


@pytest.mark.parametrize("text", ["brightness=1.2", "shift=-2", "rephrase", "brightness=0.8,shift=2,rephrase"])
def test_spec_spells_what_parse_reads(text):
    assert Perturbation.parse(text).spec == text
    assert Perturbation().spec == "plain"


def test_brightness_scales_and_clips():
    images = torch.tensor([0, 10, 100, 240], dtype=torch.uint8).reshape(1, 1, 2, 2, 1).expand(1, 1, 2, 2, 3)
    out = Perturbation(brightness=1.2).images(images)
    assert out.dtype == torch.uint8
    assert out[0, 0, :, :, 0].flatten().tolist() == [0, 12, 120, 255]
    assert Perturbation(brightness=0.8).images(images)[0, 0, :, :, 0].flatten().tolist() == [0, 8, 80, 192]


@pytest.mark.parametrize("s", [2, -2])
def test_shift_translates_with_the_edge_repeated(s):
    images = torch.zeros(2, 2, 16, 16, 3, dtype=torch.uint8)
    images[:, :, 5, 7] = 200                                  # one marked pixel per image
    images[:, :, :, 0] = 50                                   # the left edge column
    out = Perturbation(shift_pixels=s).images(images)
    assert out.shape == images.shape
    assert (out[:, :, 5 + s, 7 + s] == 200).all() and int((out == 200).sum()) == 2 * 2 * 3
    if s > 0:   # the first s columns repeat the edge
        assert (out[:, :, :, :s + 1] == 50).all()


def test_rephrase_uses_a_phrasing_training_never_saw():
    specs = resolve_tasks(None)
    assert set(HELD_OUT_INSTRUCTIONS) == {s.name for s in specs}
    p = Perturbation(rephrase=True)
    said = p.instructions([s.instruction for s in specs])
    for spec, new in zip(specs, said):
        assert new == HELD_OUT_INSTRUCTIONS[spec.name] and new != spec.instruction
        # the verb carrying the task is a new word for that task
        assert set(new.split()) - set(spec.instruction.split()), (spec.name, new)
    assert len(set(said)) == len(said)
    with pytest.raises(ValueError, match="no held-out phrasing"):
        p.instructions(["juggle the cubes"])


class RecordingPolicy:
    """Motionless; keeps what it was shown."""

    class config:
        n_cams, image_size, horizon = 2, 64, 4

    def __init__(self):
        self.seen = []

    def __call__(self, images, instruction, proprio):
        self.seen.append((images.clone(), list(instruction)))
        return torch.zeros(images.shape[0], 4, 4)


def test_perturbed_policy_shows_the_policy_the_perturbed_observation():
    inner = RecordingPolicy()
    wrapped = PerturbedPolicy(inner, Perturbation(brightness=2.0, rephrase=True))
    images = torch.full((1, 2, 8, 8, 3), 60, dtype=torch.uint8)
    spec = resolve_tasks("door-open")[0]
    wrapped(images, [spec.instruction], torch.zeros(1, 4))
    seen_images, seen_text = inner.seen[0]
    assert (seen_images == 120).all() and seen_text == [HELD_OUT_INSTRUCTIONS["door-open"]]
    assert wrapped.config is inner.config


def test_the_preprocessing_a_graph_captures_is_perturbed_too():
    """GraphedForward runs prepare_inputs outside the graph: it must see the perturbed
    observation, as __call__ does, not the wrapped policy's plain one."""
    from qvla_ros.policy import make_policy

    policy = make_policy("micro", seed=0)
    cfg = policy.config
    images = torch.randint(0, 200, (2, cfg.n_cams, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8)
    text, proprio = ["pull the drawer open"] * 2, torch.zeros(2, cfg.proprio_dim)
    p = Perturbation(brightness=1.2, shift_pixels=2)
    wrapped = PerturbedPolicy(policy, p)
    got = wrapped.prepare_inputs(images, text, proprio)
    want = policy.prepare_inputs(p.images(images), text, proprio)
    plain = policy.prepare_inputs(images, text, proprio)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert not all(torch.equal(a, b) for a, b in zip(got, plain))
    with pytest.raises(AttributeError):
        PerturbedPolicy(RecordingPolicy(), p).prepare_inputs


def test_a_perturbed_evaluation_runs_the_same_episodes():
    kwargs = dict(tasks="drawer-open", episodes_per_task=2, batch_size=2, max_steps=6, progress=False)
    plain_policy, shifted_policy = RecordingPolicy(), RecordingPolicy()
    plain = evaluate(lambda: plain_policy, **kwargs)
    shifted = evaluate(lambda: shifted_policy, perturbation=Perturbation(shift_pixels=2, rephrase=True), **kwargs)
    assert shifted.settings["perturbation"] == {"brightness": 1.0, "shift_pixels": 2, "rephrase": True}
    assert plain.settings["perturbation"] is None
    pairs = pair_outcomes(outcomes_of(plain.episodes), outcomes_of(shifted.episodes))
    assert len(pairs["drawer-open"]) == 2
    (img_a, text_a), (img_b, text_b) = plain_policy.seen[0], shifted_policy.seen[0]
    # Same scene, same seed: the shifted view is the plain view moved by 2 px, edge repeated.
    assert torch.equal(img_b, Perturbation(shift_pixels=2).images(img_a))
    assert text_b == [HELD_OUT_INSTRUCTIONS["drawer-open"]] * 2 and text_a != text_b
