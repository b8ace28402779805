"""The engine's torch-free core: configuration, request state, the scheduler, KV block
bookkeeping with the prefix cache, batch order and Hydragen's grouping policy. The engine runs
it with a ModelRunner; the simulator (ridgeline.sim) runs the same rules on counts."""

from .config import CacheConfig, EngineConfig, HydragenConfig, SchedulerConfig, parse_memory_size
from .kv_blocks import BlockAllocator, BlockManager
from .request import Request, Sequence, SeqStatus
from .scheduler import ModelRunnerOutput, ScheduledSeq, Scheduler, SchedulerOutput, SeqUpdate
from .stats import EngineStats

__all__ = ["CacheConfig", "EngineConfig", "HydragenConfig", "SchedulerConfig", "parse_memory_size",
           "BlockAllocator", "BlockManager", "Request", "Sequence", "SeqStatus", "ModelRunnerOutput",
           "ScheduledSeq", "Scheduler", "SchedulerOutput", "SeqUpdate", "EngineStats"]
