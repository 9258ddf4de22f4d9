"""Data: shard columns, Parquet shards and outputs, prompt files, chat prompts."""
