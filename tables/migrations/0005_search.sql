-- Full-text search over the order and customer read models (GET /query/search).
--
-- Each searchable row carries its own tsvector, a generated column: Postgres computes
-- it in the statement that writes the row, so it commits with the row, in the
-- projection's batch transaction, and a replay (whose tables are copies of these,
-- generated columns and indexes included) rebuilds it. The 'simple' configuration
-- (lower-cased words, no stemming, no stop words) suits names, e-mail addresses,
-- SKUs and addresses; queries must use the same one.
--
-- Weights rank a match: A the customer's name and e-mail and the ids a client may
-- paste (order, customer, tracking number), B the parts of the e-mail (its local part,
-- its domain and their words) and the products' SKUs, C the shipping address.

-- The order's shipping address as one line; NULL for orders this read model folded
-- before this migration (the address was not kept): `streamfold replay orders` fills
-- it in (README, "Search").
ALTER TABLE order_summaries ADD COLUMN shipping_address text;
-- The SKUs (product ids) of the order's current items, space-separated, in order:
-- kept by the projection in the same batch as order_items.
ALTER TABLE order_summaries ADD COLUMN skus text NOT NULL DEFAULT '';

-- What every existing order holds now: its items are already in the read model.
UPDATE order_summaries o SET skus = i.skus
FROM (
    SELECT order_id, string_agg(product_id, ' ' ORDER BY product_id COLLATE "C") AS skus
    FROM order_items GROUP BY order_id
) i
WHERE i.order_id = o.order_id;

-- Adding a stored generated column computes it for every existing row: the backfill.
ALTER TABLE order_summaries ADD COLUMN search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('simple', customer_name), 'A')
    || setweight(to_tsvector('simple', customer_email), 'A')
    || setweight(to_tsvector('simple', order_id), 'A')
    || setweight(to_tsvector('simple', customer_id), 'A')
    || setweight(to_tsvector('simple', coalesce(tracking_number, '')), 'A')
    || setweight(to_tsvector('simple', replace(customer_email, '@', ' ')), 'B')
    || setweight(
        to_tsvector('simple', regexp_replace(customer_email, '[@.+_-]+', ' ', 'g')), 'B'
    )
    || setweight(to_tsvector('simple', skus), 'B')
    || setweight(to_tsvector('simple', coalesce(shipping_address, '')), 'C')
) STORED;
CREATE INDEX order_summaries_search ON order_summaries USING gin (search);

ALTER TABLE customers ADD COLUMN search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('simple', name), 'A')
    || setweight(to_tsvector('simple', email), 'A')
    || setweight(to_tsvector('simple', customer_id), 'A')
    || setweight(to_tsvector('simple', replace(email, '@', ' ')), 'B')
    || setweight(to_tsvector('simple', regexp_replace(email, '[@.+_-]+', ' ', 'g')), 'B')
) STORED;
CREATE INDEX customers_search ON customers USING gin (search);
