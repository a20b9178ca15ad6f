"""What the MetaWorld bundle keeps (qvla_ros/sim/metaworld_bundle.py, scripts/make_metaworld_bundle.sh):
the XML files an <include> chain pulls in, and the files one task really uses. The task test is
skipped only where MetaWorld is not installed (requirements.txt)."""
import importlib.util
import os

import pytest

from qvla_ros.sim.bundle_files import record_opens, xml_includes


def test_xml_includes_follows_nested_includes_from_the_main_folder(tmp_path):
    (tmp_path / "main").mkdir()
    (tmp_path / "objects").mkdir()
    main = tmp_path / "main" / "scene.xml"
    main.write_text('<mujoco><include file="../objects/a.xml"/><worldbody>'
                    '<include file="..\\objects\\b.xml"/></worldbody></mujoco>')
    # Nested: relative to the main file's folder first, else to the including file's.
    (tmp_path / "objects" / "a.xml").write_text('<mujocoinclude><include file="../objects/c.xml"/>'
                                                '<include file="d.xml"/><include file="missing.xml"/>'
                                                '</mujocoinclude>')
    (tmp_path / "objects" / "b.xml").write_text("<mujocoinclude/>")
    (tmp_path / "objects" / "c.xml").write_text("<mujocoinclude/>")
    (tmp_path / "objects" / "d.xml").write_text("<mujocoinclude/>")
    (tmp_path / "objects" / "unused.xml").write_text("<mujocoinclude/>")
    assert xml_includes(main) == {str(main)} | {str(tmp_path / "objects" / f"{n}.xml") for n in "abcd"}


def test_record_opens_sees_python_opens_inside_the_block_only(tmp_path):
    inside, outside = tmp_path / "in.txt", tmp_path / "out.txt"
    inside.write_text("x")
    outside.write_text("y")
    with record_opens() as opened:
        inside.read_text()
    outside.read_text()
    assert str(inside) in opened and str(outside) not in opened


@pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="MetaWorld not installed")
def test_one_task_uses_its_scene_xml_meshes_and_textures():
    import metaworld
    from qvla_ros.sim.metaworld_bundle import collect_task_files

    files = collect_task_files("drawer-open", render=True, steps=1)
    assert all(os.path.isabs(f) and os.path.isfile(f) for f in files)
    assets = os.path.join(os.path.dirname(metaworld.__file__), "assets") + os.sep
    used = {f[len(assets):] for f in files if f.startswith(assets)}
    # The model file, the includes it pulls in, the drawer's and the robot's meshes, textures.
    assert "sawyer_xyz/sawyer_drawer.xml" in used
    assert {"scene/basic_scene.xml", "objects/assets/drawer.xml",
            "objects/assets/xyz_base_dependencies.xml"} <= used
    assert "objects/meshes/drawer/drawerhandle.stl" in used
    assert any(f.startswith("objects/meshes/xyz_base/") for f in used)
    assert any(f.startswith("textures/") and f.endswith(".png") for f in used)
    # Nothing of the other scenes: what makes the bundle small.
    assert not any("/faucet" in f or "/window" in f for f in used)
    assert len(used) < 60
