"""Fused kernels for the contrastive NCE loss of AMDIM (Bachman et al., 2019)."""
from .api import nce_loss
from .module import NCELoss
from .multiscale import Losses, multiscale_nce
from .reference import nce_loss_reference
from .registry import available_backends, build_info
from .backend_settings import Settings, TileConfig, current_settings, settings

__all__ = ["nce_loss", "NCELoss", "multiscale_nce", "Losses", "available_backends", "build_info",
           "nce_loss_reference", "Settings", "TileConfig", "settings", "current_settings", "__version__"]
__version__ = "0.1.0"
