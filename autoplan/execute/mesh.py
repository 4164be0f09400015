"""The device mesh over ("pp", "dp", "tp"): pipeline outermost, tensor innermost (tensor-parallel groups are
consecutive ranks, so they stay inside a node).

Example (one process needs no mesh; under torchrun with 4 ranks ``build_mesh(Mesh(pp=2, tp=2), "cpu")``
gives a 2×1×2 DeviceMesh):
    >>> from autoplan.execute.mesh import mesh_coordinates
    >>> from autoplan.plan import Mesh
    >>> mesh_coordinates(Mesh(pp=2, dp=1, tp=2), rank=3)
    {'pp': 1, 'dp': 0, 'tp': 1}
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..plan import Mesh

__all__ = ["AXES", "build_mesh", "mesh_coordinates", "rank_at"]

AXES = ("pp", "dp", "tp")


def build_mesh(mesh: Mesh, device_type: str) -> DeviceMesh:
    """A DeviceMesh of shape (pp, dp, tp) named ("pp", "dp", "tp") over the default process group.

    Example (under torchrun, 4 ranks):
        ``build_mesh(Mesh(dp=2, tp=2), "cpu")["tp"].size() == 2``
    """
    return init_device_mesh(device_type, (mesh.pp, mesh.dp, mesh.tp), mesh_dim_names=AXES)


def mesh_coordinates(mesh: Mesh, rank: int) -> dict[str, int]:
    """This rank's index on each axis (row-major over pp, dp, tp).

    Example:
        >>> mesh_coordinates(Mesh(pp=2, dp=2, tp=1), rank=2)
        {'pp': 1, 'dp': 0, 'tp': 0}
    """
    return {"pp": rank // (mesh.dp * mesh.tp), "dp": (rank // mesh.tp) % mesh.dp, "tp": rank % mesh.tp}


def rank_at(mesh: Mesh, pp: int, dp: int, tp: int) -> int:
    """The global rank at mesh coordinates (pp, dp, tp).

    Example:
        >>> rank_at(Mesh(pp=2, dp=2, tp=2), 1, 0, 1)
        5
    """
    return (pp * mesh.dp + dp) * mesh.tp + tp
