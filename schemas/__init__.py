"""Avro schemas, one file per record and version: ``<area>/<Record>/v<N>.avsc``.

Upcasters ``upcast_vN_to_vN1(data) -> data`` live in ``upcasters.py`` beside a record's
versions; ``app.adapters.catalog`` reads this tree.
"""
