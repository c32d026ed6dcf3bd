"""nnU-Net v2 results folders → edgeseg bundles (build time only).

:mod:`.folder` reads a ``…/DatasetXXX_Name/<Trainer>__<Plans>__<config>/`` folder,
:mod:`.network` rebuilds its network from the plans (dynamic_network_architectures, deep
supervision off) and loads each fold's weights, :mod:`.spec` translates nnU-Net's inference into
an edgeseg spec (or refuses, naming the plan field), :mod:`.build` runs the ordinary build.
Nothing here needs nnunetv2 or the trainer class: the plans and checkpoints say everything.
"""

from edgeseg.export.nnunet.build import build_from_nnunet
from edgeseg.export.nnunet.folder import is_nnunet_folder, read_folder

__all__ = ["build_from_nnunet", "is_nnunet_folder", "read_folder"]
