"""DMS retrofit toolkit: Dynamic Memory Sparsification for Hugging Face causal LMs.

    import dms
    model = dms.retrofit(model, dms.DMSConfig(window=256))   # patch in place
    model, tok = dms.load("runs/my-model/export")            # a retrofitted checkpoint
    out = model.generate(**tok("Hello", return_tensors="pt")) # the KV cache prunes itself
"""
from .cache import DMSCache
from .config import DMSConfig
from .inference import load
from .patching import (SUPPORTED_FAMILIES, dms_disabled, dms_state, enable_gradient_checkpointing, packed_documents,
                       retention_parameters, retrofit)

__all__ = [
    "DMSCache", "DMSConfig", "SUPPORTED_FAMILIES", "dms_disabled", "dms_state", "enable_gradient_checkpointing", "load",
    "packed_documents", "retention_parameters", "retrofit",
]
__version__ = "0.1.0"
