"""Extension instances, created unbound and attached to each app in ``create_app``."""

from __future__ import annotations

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase

from outbox.contrib.flask import Outbox


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)
outbox = Outbox(db=db)
