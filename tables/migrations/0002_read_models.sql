-- Read models under the reference article's names. Money is integer minor units
-- with its currency; never a float.

-- The last stream version each projection applied per aggregate: an event seen
-- again (a re-emission after a crash, or a replay overlap) changes nothing.
CREATE TABLE projection_streams (
    projection   text   NOT NULL,
    aggregate_id text   NOT NULL,
    version      bigint NOT NULL,
    PRIMARY KEY (projection, aggregate_id)
);

CREATE TABLE customers (
    customer_id text PRIMARY KEY,
    name        text NOT NULL,
    email       text NOT NULL,
    first_order_at timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

CREATE TABLE order_summaries (
    order_id        text PRIMARY KEY,
    customer_id     text NOT NULL,
    customer_name   text NOT NULL,
    customer_email  text NOT NULL,
    status          text NOT NULL,
    currency        text NOT NULL,
    total_minor     bigint NOT NULL,
    paid_minor      bigint NOT NULL DEFAULT 0,
    items_count     integer NOT NULL,
    tracking_number text,
    carrier         text,
    cancel_reason   text,
    account_id      text,
    version         bigint NOT NULL,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX order_summaries_customer ON order_summaries (customer_id, created_at DESC);
CREATE INDEX order_summaries_status ON order_summaries (status, created_at DESC);
CREATE INDEX order_summaries_created ON order_summaries (created_at DESC);

CREATE TABLE order_items (
    order_id          text   NOT NULL,
    product_id        text   NOT NULL,
    quantity          integer NOT NULL,
    unit_price_minor  bigint NOT NULL,
    tax_rate_bps      integer NOT NULL,
    total_price_minor bigint NOT NULL,
    PRIMARY KEY (order_id, product_id)
);

CREATE TABLE customer_statistics (
    customer_id          text   NOT NULL,
    currency             text   NOT NULL,
    total_orders         integer NOT NULL DEFAULT 0,
    lifetime_value_minor bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (customer_id, currency)
);

CREATE TABLE account_balances (
    account_id            text PRIMARY KEY,
    owner_id              text   NOT NULL,
    currency              text   NOT NULL,
    balance_minor         bigint NOT NULL,
    overdraft_limit_minor bigint NOT NULL,
    status                text   NOT NULL,
    version               bigint NOT NULL,
    last_updated          timestamptz NOT NULL
);

CREATE TABLE transactions (
    event_id            text PRIMARY KEY,
    account_id          text   NOT NULL,
    transaction_id      text   NOT NULL,
    kind                text   NOT NULL CHECK (kind IN ('DEPOSIT', 'WITHDRAWAL')),
    amount_minor        bigint NOT NULL,
    currency            text   NOT NULL,
    counterparty        text   NOT NULL,
    reference           text   NOT NULL,
    balance_after_minor bigint NOT NULL,
    stream_version      bigint NOT NULL,
    occurred_at         timestamptz NOT NULL
);
CREATE INDEX transactions_account ON transactions (account_id, stream_version DESC);

-- The financial report: totals per UTC day and currency, from the ledger.
CREATE TABLE financial_daily_totals (
    day               date   NOT NULL,
    currency          text   NOT NULL,
    deposits_minor    bigint NOT NULL DEFAULT 0,
    withdrawals_minor bigint NOT NULL DEFAULT 0,
    deposit_count     integer NOT NULL DEFAULT 0,
    withdrawal_count  integer NOT NULL DEFAULT 0,
    PRIMARY KEY (day, currency)
);
