"""The Celery application object: ``celery -A worker.app worker`` starts a turn worker."""

from __future__ import annotations

from celery import Celery

from config.celery import celery_config
from config.settings import get_settings

app = Celery("agent_turn_worker", include=["worker.tasks"])
app.config_from_object(celery_config(get_settings()))
