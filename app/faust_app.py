"""The Faust application, wired from settings. Agents register themselves on it."""

from __future__ import annotations

from pathlib import Path

import faust

from app.settings import Settings


def worker_datadir(settings: Settings) -> Path:
    return settings.home / "worker-data" / f"{settings.app_id}-{settings.web_port}"


def create_app(settings: Settings) -> faust.App:
    worker_datadir(settings).parent.mkdir(parents=True, exist_ok=True)
    credentials = None
    if settings.sasl_mechanism:
        credentials = faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            mechanism=settings.sasl_mechanism,
            ssl_context=None,
        )
    return faust.App(
        settings.app_id,
        broker=[f"kafka://{hp}" for hp in settings.bootstrap_servers.split(",")],
        broker_credentials=credentials,
        store="rocksdb://" if settings.store == "rocksdb" else "memory://",
        # One directory per worker (app id + web port), so two workers of one app on
        # one machine never share a RocksDB store.
        datadir=str(worker_datadir(settings)),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        producer_acks=-1,
        # The tables' changelog and the customers' repartition records go out in
        # batches of up to 5 ms instead of one produce request each: profiled under
        # load, the Faust process spent 14% of its time sending produce requests
        # with Faust's default (0), 7% with this.
        producer_linger=0.005,
        consumer_auto_offset_reset="earliest",
        # Streamfold catches every error itself; anything escaping is a bug that must
        # stop the worker rather than let Faust ack and skip the message.
        agent_supervisor="mode.CrashingSupervisor",
        web_host=settings.web_host,
        web_bind=settings.web_host,
        web_port=settings.web_port,
        web_in_thread=False,
        table_standby_replicas=0,
        # A local store ahead of its changelog (the changelog topic lost or
        # recreated) is not an error here: every aggregate is checked against the
        # event topic, the source of truth, from the position recorded beside it.
        # Faust's check would stop the worker for good (ConsistencyError).
        recovery_consistency_check=False,
        # Each Faust commit moves a partition's committed offset past one of the
        # write side's transactions at most: the transaction markers between them
        # leave a duplicate in Faust's acked offsets that ends the run it commits
        # (faust-streaming's gap handling; robinhood/faust#625 is that symptom). At
        # the 1 s this was before, 8,000 commands paced at 800/s left the group 9,000
        # records behind and it caught up at about 15 a second (10 minutes, all of
        # them folded again by a restart in that time); at 0.1 s in under a minute,
        # with the same CPU for the load. The committed position still falls behind
        # while the write side commits more than about 10 transactions a second on a
        # partition (the views themselves keep up; only a restart folds more).
        broker_commit_interval=0.1,
        # A killed worker's partitions move on after this, not Faust's default 60s.
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(settings.session_timeout_s / 10, 0.5),
        broker_rebalance_timeout=max(settings.session_timeout_s * 2, 20.0),
        autodiscover=False,
    )
