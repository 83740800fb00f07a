"""The drivers' shared command line: --mesh builds the data-parallel mesh the drivers pass on."""

import pytest

from experiments import common


def test_mesh_flag(capsys):
    try:
        assert common.set_mesh("none") is None and common.MESH is None
        mesh = common.set_mesh("all")
        assert dict(mesh.shape) == {"data": 8} and common.MESH is mesh
        assert dict(common.set_mesh("2").shape) == {"data": 2}
        assert "devices: 8 x cpu" in capsys.readouterr().out
        for bad in ("9", "many"):
            with pytest.raises(ValueError, match="--mesh"):
                common.set_mesh(bad)
    finally:
        common.set_mesh("none")
