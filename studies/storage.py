"""Where a study lives: a SQLite file (default), a journal file, or any RDB URL (PostgreSQL for many machines).

    None                          -> sqlite:///<run.dir>/studies/NAME/study.db
    sqlite:///path/study.db       -> RDB storage on a SQLite file (one machine, a few workers)
    journal:path/study.log        -> JournalStorage on a file (many processes on one machine or a shared disk)
    postgresql://user:pw@host/db  -> RDB storage on a server (workers on many machines)

RDB storages get heartbeats: a worker that dies mid-trial stops beating, the next worker marks that
trial FAIL and enqueues a copy of its parameters (RetryHeartbeatStaleTrialCallback). Journal storages
have no heartbeats in Optuna 5: a killed worker's trial stays RUNNING and is not retried.
"""
from __future__ import annotations

import re
import time
import warnings
from pathlib import Path

from routerlab.errors import ConfigError

MAX_RETRY = 3  # a trial whose workers keep dying is given up after this many retries
SCHEMA_RACE_ATTEMPTS = 10  # workers started together on a new database race to create its tables


def default_url(run_dir: Path) -> str:
    return f"sqlite:///{run_dir / 'study.db'}"


def redact(url: str) -> str:
    """The URL with its password replaced, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_storage(url: str, heartbeat: int = 10):
    """An Optuna storage for `url`; any problem (bad URL, missing driver, unreachable server) is a ConfigError."""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are marked experimental
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        if not path.name:
            raise ConfigError(f"storage {url!r}: give a journal file, for example journal:runs/studies/NAME/study.log")
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        except OSError as err:
            raise ConfigError(f"storage {url!r}: cannot open the journal file: {err}") from None
    if "://" not in url:
        raise ConfigError(f"storage {url!r} is not a storage URL; valid: sqlite:///path/study.db, journal:path/study.log, postgresql://user:password@host:port/database")
    given = url  # messages name what the user wrote (password hidden), not the driver we picked
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise ConfigError(f"storage {redact(url)!r} is not a valid database URL: {err}") from None
    engine_kwargs = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ConfigError(f"storage {url!r}: an in-memory SQLite database cannot be shared by workers or resumed; use sqlite:///path/study.db")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several local workers wait for the write lock
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs = {"connect_args": {"connect_timeout": 10}}
        if parsed.drivername == "postgresql" and not has_module("psycopg") and has_module("psycopg2"):
            # SQLAlchemy 2.1 made psycopg 3 the default driver; the `studies` extra installs psycopg2
            url = parsed.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    for attempt in range(SCHEMA_RACE_ATTEMPTS):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat,
                grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY),
            )
        except Exception as err:  # driver missing, server unreachable, authentication failed, ...
            if lost_schema_race(err) and attempt + 1 < SCHEMA_RACE_ATTEMPTS:
                time.sleep(0.1 * (attempt + 1))  # the winner finishes its schema; the next attempt finds it
                continue
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"cannot open storage {redact(given)!r}: {first}") from None


def lost_schema_race(err: Exception) -> bool:
    """Did another process create Optuna's tables while this one was creating them too?

    Workers started together on a new database all try to create the schema; the losers see
    "table ... already exists" or a duplicate alembic_version row. Opening again succeeds.
    """
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    text = str(err).lower()
    return isinstance(err, IntegrityError) or (
        isinstance(err, (OperationalError, ProgrammingError)) and "already exists" in text)


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
