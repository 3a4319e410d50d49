"""Run Alembic migrations from code (cvopt migrate, cvopt serve, the tests)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

import migrations
from core.db import make_engine

log = logging.getLogger("cvopt.migrate")


def alembic_config(database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    cfg.set_main_option("file_template", "%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d-%%(slug)s")
    return cfg


def wait_for_database(database_url: str, timeout_s: float = 60.0) -> None:
    """The prestart step: a container may start before its database accepts connections."""
    deadline = time.monotonic() + timeout_s
    engine = make_engine(database_url)
    try:
        while True:
            try:
                with engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return
            except Exception as exc:  # connection refused, DNS not ready yet, ...
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the database at {engine.url!r} is not reachable: {exc}") from exc
                log.info("waiting for the database: %s", exc)
                time.sleep(1)
    finally:
        engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> None:
    wait_for_database(database_url)
    command.upgrade(alembic_config(database_url), revision)
