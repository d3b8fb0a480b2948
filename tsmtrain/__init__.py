"""tsmtrain: large-batch Temporal Shift Module training on HPC clusters."""
__version__ = "0.1.0"
