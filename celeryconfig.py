"""Celery settings for the example, read from the environment (see ``webapp.config``)."""

from outbox import OutboxSettings
from outbox.contrib.celery import (
    CLEANUP_TASK_NAME,
    SWEEP_QUEUE,
    SWEEP_TASK_NAME,
    periodic_tasks,
    task_queues,
)
from webapp import config

broker_url = config.broker_url()
broker_transport_options = config.broker_transport_options()
broker_connection_retry_on_startup = True
result_backend = config.result_backend()
# Bounded like the broker's sockets (used when the result backend is Redis).
redis_socket_timeout = 10
redis_socket_connect_timeout = 5

# JSON only, on every path: a pickle payload is code execution for whoever can publish.
task_serializer = "json"
result_serializer = "json"
event_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

timezone = "UTC"
enable_utc = True
result_expires = 24 * 3600

# Events for Flower from the start: "sent" when the relay publishes, then received,
# started, succeeded/failed from the worker, all under the id fixed at enqueue.
worker_send_task_events = True
task_send_sent_event = True

# Both queues are declared, so a plain `celery -A tasks worker` consumes the sweep's as
# well as the tasks'. Production can give the sweep a worker of its own
# (`celery -A tasks worker -Q outbox -c 1`) and the tasks theirs (`-Q celery`).
task_default_queue = "celery"
task_queues = task_queues(task_default_queue)
task_routes = {
    SWEEP_TASK_NAME: {"queue": SWEEP_QUEUE},
    CLEANUP_TASK_NAME: {"queue": SWEEP_QUEUE},
}

beat_schedule = periodic_tasks(OutboxSettings.from_mapping(config.outbox_settings()))
beat_schedule_filename = str(config.var_dir() / "celerybeat-schedule")
