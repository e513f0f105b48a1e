"""The three training stages of Qwen-VL and which parameters each one trains.

`trainable` is the one stage policy: the optimiser's masks (train/optim.py) and the memory plan
(train/plan.py) both read it. With LoRA the whole base model is frozen instead (train/optim.py `labels`).
"""
from __future__ import annotations

from typing import Sequence

STAGES = {
    1: 'pre-training: the vision tower and the adapter train, the LLM is frozen',
    2: 'multi-task pre-training: everything trains',
    3: 'supervised fine-tuning: the LLM and the adapter train, the ViT is frozen',
}


def trainable(path: Sequence[str], stage: int) -> bool:
  """Whether a parameter (its Flax path without the 'params' key) trains in a stage. The resampler's 2D
  sin-cos table never trains; the adapter of stage 3 is the resampler (attn_pool), as in the original
  fine-tuning script's `fix_vit`."""
  if tuple(path[-2:]) == ('attn_pool', 'pos_embed'):
    return False
  if stage == 1:
    return path[0] == 'visual'
  if stage == 2:
    return True
  if stage == 3:
    return path[0] != 'visual' or path[1:2] == ('attn_pool',)
  raise ValueError(f'unknown stage {stage}; stages are {sorted(STAGES)}')
