"""End-to-end training of a Larimar model on generic text (paper Eq. 1).

Launch::

    larimar train --config configs/smollm2_cpu.yaml                     # one process (CPU or one GPU)
    larimar train --config configs/smollm2_gpu.yaml --optim.lr 1e-4     # overrides: --section.key value
    torchrun --nproc_per_node 8 -m larimar.cli train --config ...        # one node, DDP (NCCL on GPU)
    torchrun --nproc_per_node 8 -m larimar.cli train --config ... --parallel fsdp   # sharded (large decoders)
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m larimar.cli train --config ...

Each step takes `batch_episodes` episodes of `episode_size` text blocks (split across processes under DDP),
encodes the blocks, writes each episode to its own memory, reads it back and decodes every block
(rec), decodes from the block's own encoding (ae), adds beta_t * KL(w) and, when the decoder is trained,
decoding with z = 0 (lm). The run folder gets the resolved config (`config.yaml`), `metrics.jsonl`,
`checkpoint/` (the trainable state, resumable) and, at the end, `model/` (save_pretrained) and `loss.png`.

Modules (each imports only those above it):

- `larimar.training.config`: the typed config (`TrainConfig` and its sections) and YAML loading.
- `larimar.training.schedules`: the KL-weight and learning-rate schedules.
- `larimar.training.batches`: the data pipeline, from the text stream to collated micro-batches.
- `larimar.training.loop`: the loop itself, checkpoints, DDP / FSDP, metrics.

The command (`larimar train`) is `larimar.cli.train`.
"""

from larimar.training.batches import (
    BatchSpec,
    collate,
    collate_cpu,
    episode_stream,
    micro_batches,
    prefetch,
    prefix_queries,
    swap_names,
    to_device,
)
from larimar.training.config import (
    PARALLEL_MODES,
    DataConfig,
    LossConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)
from larimar.training.loop import (
    build_model,
    decoder_blocks,
    dist_info,
    init_weights,
    plot_metrics,
    save_checkpoint,
    shard_fsdp,
    train,
)
from larimar.training.schedules import beta_schedule, lr_factor, scheduled_total

__all__ = [
    "PARALLEL_MODES", "BatchSpec", "DataConfig", "LossConfig", "OptimConfig", "TrainConfig",
    "beta_schedule", "build_model", "collate", "collate_cpu", "decoder_blocks", "dist_info", "episode_stream",
    "init_weights", "load_config", "lr_factor", "micro_batches", "plot_metrics", "prefetch", "prefix_queries",
    "save_checkpoint", "scheduled_total", "shard_fsdp", "swap_names", "to_device", "train",
]
