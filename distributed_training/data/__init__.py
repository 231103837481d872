"""Data: pages of tokens addressed by id, their assignment to uids, the tokenizer, the offline assets."""
