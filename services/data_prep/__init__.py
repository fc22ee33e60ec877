"""data-prep: raw text -> cleaned, deduplicated, tokenized, packed shards."""
