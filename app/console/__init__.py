"""The operator console at ``/console`` on the worker's web server: its page, its
assets and the JSON routes behind them (``app.console.web``)."""
