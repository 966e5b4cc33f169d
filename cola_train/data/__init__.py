"""Domain data: sources → records → a deterministic sample → tokenized, prompt-masked examples."""
from .sources import DataError, load_domain_records
from .sampling import split_train_val
from .template import tokenize_records

__all__ = ["DataError", "load_domain_records", "split_train_val", "tokenize_records"]
