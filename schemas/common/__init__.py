"""Records every area shares: event metadata, command envelope, command result."""
