"""CAGE on DeepSpeed ZeRO-1/2/3: shard maps, exact sharded QuEST, engine hooks.

The only package touching DeepSpeed internals (pinned deepspeed==0.19.8, see engine.py).
"""

from . import guard  # noqa: F401  (installs QuantLinear.state_check)
from .engine import ZeroAttachment, attach, attachment, check_config, initialize
from .export import export_engine
from .optimizer import ShardedQuantOps
from .shardmap import PartitionMap, Piece, zero3_maps, zero12_maps
from .stats import quant_stats

__all__ = [
    "PartitionMap",
    "Piece",
    "ShardedQuantOps",
    "ZeroAttachment",
    "attach",
    "attachment",
    "check_config",
    "export_engine",
    "initialize",
    "quant_stats",
    "zero3_maps",
    "zero12_maps",
]
