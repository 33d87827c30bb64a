"""Speed kernels of training: varlen attention, the fused AdamW over fp32 masters, shared-input GEMMs."""
