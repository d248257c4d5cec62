"""Avro records of the order aggregate: its events, commands and value objects."""
