-- Full-text search over the order and customer read models (GET /query/search).
--
-- A search document is a tsvector in a generated column: Postgres computes it in
-- the statement that writes its row, so it commits with that row in the orders
-- projection's batch transaction, and a replay (whose tables are copies of these,
-- generated columns and indexes included) rebuilds it. The 'simple' configuration
-- (lower-cased words, no stemming, no stop words) suits names, e-mail addresses,
-- SKUs and street addresses; queries must use the same one (app/query.py).
--
-- Weights rank a match: A the customer's name and e-mail and the ids a client may
-- paste (order, customer), B the parts of the e-mail (its local part, its domain and
-- their words) and the SKUs, C the shipping address. Parsing the text is most of the
-- cost (about 20 us a document here), so each weight's text is parsed in one call.

-- An order's document lives beside order_summaries, not in it: a summary changes
-- with every event of the order (status, payment, shipping), and each new version of
-- the row would parse the document again and add it to the GIN index again. This row
-- is written when the order is created and again only when its items change.
CREATE TABLE order_search (
    order_id         text PRIMARY KEY,
    customer_id      text NOT NULL,
    customer_name    text NOT NULL,
    customer_email   text NOT NULL,
    -- The SKUs (product ids) of the order's current items, space-separated, in
    -- code-point order.
    skus             text NOT NULL,
    -- One line; NULL for an order folded before this migration (the read models
    -- did not keep it): `streamfold replay orders` fills it in (README, "Search").
    shipping_address text,
    search tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('simple',
            customer_name || ' ' || customer_email || ' ' || order_id || ' ' || customer_id
        ), 'A')
        || setweight(to_tsvector('simple',
            -- "ada@example.com" is one word; "ada example.com" and "ada example com"
            -- are its parts.
            replace(customer_email, '@', ' ') || ' '
            || translate(customer_email, '@.+_-', '     ') || ' ' || skus
        ), 'B')
        || setweight(to_tsvector('simple', coalesce(shipping_address, '')), 'C')
    ) STORED
);
CREATE INDEX order_search_search ON order_search USING gin (search);

-- The backfill: every order the read model holds, from what it holds.
INSERT INTO order_search (order_id, customer_id, customer_name, customer_email, skus)
SELECT o.order_id, o.customer_id, o.customer_name, o.customer_email, coalesce(i.skus, '')
FROM order_summaries o
LEFT JOIN (
    SELECT order_id, string_agg(product_id, ' ' ORDER BY product_id COLLATE "C") AS skus
    FROM order_items GROUP BY order_id
) i ON i.order_id = o.order_id;

-- A customer row changes only when one of their orders is created, so its document
-- sits in the row; adding the column computes it for every existing customer.
ALTER TABLE customers ADD COLUMN search tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('simple', name || ' ' || email || ' ' || customer_id), 'A')
    || setweight(to_tsvector('simple',
        replace(email, '@', ' ') || ' ' || translate(email, '@.+_-', '     ')
    ), 'B')
) STORED;
CREATE INDEX customers_search ON customers USING gin (search);
