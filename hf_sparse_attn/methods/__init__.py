"""Attention methods: each module registers one method of the contract in :mod:`.registry`.

Importing this package registers every built-in method. A method never imports transformers.
"""

from .registry import MethodSpec, Param, get_method, get_spec, list_methods, register_method
from .merge import merge_attention
from . import exact  # noqa: F401  (registers "exact")
from . import kmv, poly, feature_sketch  # noqa: F401  (Indyk et al.; Alman & Song; Deng, Mahadevan & Song)
from . import hyper, sparse_hyper  # noqa: F401  (register "hyper", "sparse_hyper")
from . import local  # noqa: F401  (registers "local": attention sinks + local window)
from . import block_select  # noqa: F401  (registers "block_select": sinks + window + selected key blocks)
from .decode import get_decode_method, get_decode_spec, list_decode_methods, register_decode_method
from . import decode_pages  # noqa: F401  (registers the decode method "quest")
from .decode_index import DecodeIndex
from .kv_buffer import KVBuffer

__all__ = ["MethodSpec", "Param", "get_method", "get_spec", "list_methods", "register_method", "merge_attention",
           "get_decode_method", "get_decode_spec", "list_decode_methods", "register_decode_method", "DecodeIndex",
           "KVBuffer"]
