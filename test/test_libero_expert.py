"""The scripted LIBERO expert solves a fixed task from a fixed initial state. Skipped only where
the simulator is not installed (scripts/bootstrap.sh installs it)."""
import numpy as np
import pytest
import torch

from qvla_ros.sim.libero import simulator_missing

if simulator_missing():
    pytest.skip(simulator_missing(), allow_module_level=True)

from qvla_ros.sim.libero.env import LiberoEnv  # noqa: E402
from qvla_ros.sim.libero.expert import (LiberoExpert, UnsupportedTask, pick_place_goal,  # noqa: E402
                                        run_expert_episode)


def test_expert_puts_the_object_in_the_basket():
    with LiberoEnv("libero_object", 1, cameras=()) as env:    # the cream cheese
        assert pick_place_goal(env.libero_env) == ("in", "cream_cheese_1", "basket_1")
        result = run_expert_episode(env, LiberoExpert(), init_state=0)
        assert result["success"], result
        assert result["steps"] < env.max_steps
        # The object really is in the basket: above its floor, inside its footprint.
        lenv = env.libero_env
        obj = env.sim.data.body_xpos[lenv.obj_body_id["cream_cheese_1"]]
        basket = env.sim.data.body_xpos[lenv.obj_body_id["basket_1"]]
        assert np.linalg.norm(obj[:2] - basket[:2]) < 0.08 and obj[2] > basket[2]


def test_expert_contract_call_and_unsupported_goal():
    with LiberoEnv("libero_object", 1, cameras=()) as env:
        obs = env.reset(0, render=False)
        expert = LiberoExpert()
        with pytest.raises(RuntimeError, match="bind_envs"):
            expert(None, [obs["instruction"]], torch.from_numpy(obs["proprio"][None]))
        expert.bind_envs([env])
        out = expert(None, [obs["instruction"]], torch.from_numpy(obs["proprio"][None]))
        assert out.shape == (1, 1, 7) and out.dtype == torch.float32
        assert torch.all(out.abs() <= 1.0) and out[0, 0, 6] == -1.0   # approaching: gripper open
        lenv = env.libero_env
        saved = lenv.parsed_problem["goal_state"]
        try:
            lenv.parsed_problem["goal_state"] = [["open", "basket_1"]]
            with pytest.raises(UnsupportedTask, match="not one"):
                pick_place_goal(lenv)
        finally:
            lenv.parsed_problem["goal_state"] = saved


def test_expert_puts_the_bowl_on_the_plate():
    with LiberoEnv("libero_spatial", 0, cameras=()) as env:
        result = run_expert_episode(env, LiberoExpert(), init_state=0)
        assert result["success"], result
