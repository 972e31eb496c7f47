"""The LAION aesthetic predictor head (christophschuhmann/improved-aesthetic-predictor).

An MLP on L2-normalised CLIP ViT-L/14 image embeddings (D = 768) that predicts a
1-10 rating. Its layers are five Linear maps with dropout between the first four and
no non-linearity (the public checkpoint ``sac+logos+ava1-l14-linearMSE.pth`` was
trained that way), stored under ``layers.{0,2,4,6,7}``. The widths are read from the
weights, so smaller heads of the same layout (used by the tests) load too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from easyanimate_rt.errors import CheckpointError

LAION_WIDTHS = (768, 1024, 128, 64, 16, 1)
_LINEAR_SLOTS = (0, 2, 4, 6, 7)  # Sequential positions of the Linear layers
_DROPOUTS = {1: 0.2, 3: 0.2, 5: 0.1}


class LaionAestheticHead(nn.Module):
    def __init__(self, widths: Sequence[int] = LAION_WIDTHS):
        super().__init__()
        if len(widths) != len(_LINEAR_SLOTS) + 1:
            raise CheckpointError(f"aesthetic head needs {len(_LINEAR_SLOTS) + 1} widths, got {list(widths)}")
        self.input_size = int(widths[0])
        modules: list[nn.Module] = []
        linear = iter(zip(widths[:-1], widths[1:]))
        for slot in range(_LINEAR_SLOTS[-1] + 1):
            if slot in _LINEAR_SLOTS:
                d_in, d_out = next(linear)
                modules.append(nn.Linear(d_in, d_out))
            else:
                modules.append(nn.Dropout(_DROPOUTS[slot]))
        self.layers = nn.Sequential(*modules)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb).squeeze(-1)  # (N, D) -> (N,)


def load_aesthetic_head(path: str | Path) -> LaionAestheticHead:
    """Load a head from a ``.pth``/``.pt`` state dict or a ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"aesthetic head weights {path} do not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read aesthetic head weights {path}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    keys = [f"layers.{slot}.weight" for slot in _LINEAR_SLOTS]
    absent = [k for k in keys if k not in state]
    if absent:
        raise CheckpointError(f"{path} is not a LAION aesthetic head: missing {absent}")
    widths = [state[keys[0]].shape[1], *(state[k].shape[0] for k in keys)]
    head = LaionAestheticHead(widths)
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return head
