"""Input text (files, folders, JSONL, Parquet, Arrow, or the built-in corpus), the tokenizer, and packing
documents into fixed-length token sequences stored as Arrow shards."""
