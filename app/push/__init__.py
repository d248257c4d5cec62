"""WebSocket push: committed events, as they arrive, to clients on the worker's web
server (``/ws``); the protocol in ``protocol``, the connections in ``hub``."""
