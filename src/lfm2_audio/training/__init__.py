"""Training and fine-tuning: data mapping and packing (data), loss (loss), the loop (trainer).

    python -m lfm2_audio.training.data CONVERSATIONS.jsonl OUT_DIR --checkpoint DIR   # precompute
    python -m lfm2_audio.training.trainer CONFIG.json                                 # train
"""

from .data import (Audio, Batch, Interleaved, Message, Sample, SampleStore, SampleWriter, Text, collate,
                   map_conversation, pack_rows, precompute, read_conversations)
from .loss import codebook_weights, forward_sums, loss_fn, packed_backbone
from .trainer import TrainConfig, train

__all__ = [
    "Audio", "Batch", "Interleaved", "Message", "Sample", "SampleStore", "SampleWriter", "Text", "TrainConfig",
    "codebook_weights", "collate", "forward_sums", "loss_fn", "map_conversation", "pack_rows", "packed_backbone",
    "precompute", "read_conversations", "train",
]
