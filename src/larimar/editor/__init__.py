"""The editor: facts in, answers out, on a trained Larimar model.

    editor.py   `Larimar`: edit / forget / ask / score / save / load (the Python API)
    refine.py   write-time latent refinement (`Refinement`)
    read.py     the scope decision and the one read-mode dispatch (`route`, `read_at`)
    files.py    the saved-memory folder format (safetensors + JSON manifest)
"""

from larimar.editor.editor import (
    DEFAULT_CHECKPOINT,
    LATENT_SCOPE_ENCODER,
    SCOPE_MODES,
    Answer,
    Larimar,
)
from larimar.editor.read import Routing
from larimar.editor.refine import Refinement

__all__ = ["DEFAULT_CHECKPOINT", "LATENT_SCOPE_ENCODER", "SCOPE_MODES", "Answer", "Larimar", "Refinement", "Routing"]
