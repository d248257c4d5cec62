"""GraphQL at ``/graphql`` on the worker's web server: queries over the read models,
one mutation per command (through the HTTP commands' gateway), and a subscription
to an aggregate's events."""
