"""Avro records of the account aggregate: its events and commands."""
