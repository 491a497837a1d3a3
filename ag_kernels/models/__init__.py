"""Models wing: network architectures, our checkpoint format with its safe loader, the EDM2 adapter.

``nets`` (the architecture registry and :class:`TinyDenoiser`) <- ``checkpoint``
(:func:`save_net`, :func:`load_net`) <- ``edm2`` (EDM2 snapshots, presets, checkouts);
``diffusers_models`` (diffusers networks as EDM denoisers; imports diffusers only when used).  It imports
no other wing.
"""

from .checkpoint import CheckpointError, UnsafeCheckpointError, load_net, save_net
from .edm2 import EDM2Error, load_snapshot
from .nets import ARCHS, TinyDenoiser, get_arch, register_arch

__all__ = ["load_net", "save_net", "CheckpointError", "UnsafeCheckpointError", "TinyDenoiser", "register_arch",
           "get_arch", "ARCHS", "load_snapshot", "EDM2Error"]
