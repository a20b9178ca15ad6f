"""The one action-error metric (quant/action_error.py): its normalization and its refusals."""
import pytest
import torch

from qvla_ros.quant.action_error import action_error, action_error_per_frame


def test_sums_over_the_chunk_and_averages_over_frames():
    reference = torch.zeros(2, 3, 4)
    actions = reference.clone()
    actions[0] += 1.0          # frame 0: 12 elements off by 1 -> 12
    actions[1, 0, 0] = 2.0     # frame 1: one element off by 2 -> 4
    assert action_error_per_frame(actions, reference).tolist() == [12.0, 4.0]
    assert action_error(actions, reference) == 8.0
    assert action_error(reference, reference) == 0.0


@pytest.mark.parametrize("actions, reference", [(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)),
                                                (torch.zeros(2, 12), torch.zeros(2, 12)),
                                                (torch.zeros(0, 3, 4), torch.zeros(0, 3, 4))])
def test_refuses_chunks_it_cannot_compare(actions, reference):
    with pytest.raises(ValueError, match="action error"):
        action_error(actions, reference)
