"""Weight sparsity inside experts (MoE-Pruner, Wanda, magnitude; unstructured or N:M): masks, targets, the command."""

from surgery.refine.sparsify.masks import BITS_DTYPES, METHODS, SparsifyError, check_sparsity, parse_pattern, row_mask
from surgery.refine.sparsify.run import check_nm, sparsify_checkpoint

__all__ = ["BITS_DTYPES", "METHODS", "SparsifyError", "check_nm", "check_sparsity", "parse_pattern", "row_mask",
           "sparsify_checkpoint"]
