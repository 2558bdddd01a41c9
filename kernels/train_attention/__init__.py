"""DMS training attention: causal + document mask + delayed-eviction soft mask (see reference.py)."""
from .reference import dms_attention_reference, hard_log_keep

__all__ = ["dms_attention_reference", "hard_log_keep"]
