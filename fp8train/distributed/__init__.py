"""Multi-GPU training on PyTorch's own engine: FSDP2 sharding and torch.distributed.checkpoint (DCP).

* :func:`shard_model` -- ``fully_shard`` per decoder layer, then the root (fsdp.py);
* :func:`save_checkpoint` / :func:`load_checkpoint` -- model + fp8train.AdamW FP8 states + extra trainer state
  through DCP, saved on N ranks and loaded on M (checkpoint.py).

See docs/distributed.md.
"""

from .checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from .fsdp import decoder_layers, init_distributed, is_sharded, rank, reshard, shard_model, world_size

__all__ = ["init_distributed", "shard_model", "decoder_layers", "is_sharded", "reshard", "world_size", "rank",
           "save_checkpoint", "load_checkpoint", "read_checkpoint_info"]
