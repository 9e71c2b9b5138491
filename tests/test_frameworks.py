"""Django and Flask apps end to end (issue 21 item 3): a real project in a temp dir, its producer, a real worker.

Django: a sqlite project whose models.py enqueues from a ``post_save`` signal (so models.py imports jobs.py, the
case where a ``django.setup()`` at the top of jobs.py breaks); with ``DJANGO_SETTINGS_MODULE`` set the fork server
sets Django up before importing ``JOB_MODULES``, the job uses the ORM, and the update lands in the database.
Flask: an app factory; a request enqueues; the job builds the app and works in its app context.
Each test takes a few seconds: a producer process and a ``--burst`` worker.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(90)


def _write(root, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())


def _run(project, env, args, **extra):
    e = dict(env, PYTHONPATH=f"{project}:{REPO}", **extra)
    res = subprocess.run([sys.executable, *args], cwd=project, env=e, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{args} exited {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


DJANGO = {
    "manage.py": """
        import os, sys
        if __name__ == "__main__":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
            from django.core.management import execute_from_command_line
            execute_from_command_line(sys.argv)
    """,
    "mysite/__init__.py": "",
    "mysite/settings.py": """
        from pathlib import Path
        BASE_DIR = Path(__file__).resolve().parent.parent
        SECRET_KEY = "test-only"
        DEBUG = False
        INSTALLED_APPS = ["shop"]
        DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
        DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
        USE_TZ = True
        # an app's own LOGGING replaces the root handler; %(job)s still names the job (worker/log.py)
        LOGGING = {"version": 1, "disable_existing_loggers": False,
                   "formatters": {"app": {"format": "DJANGOLOG job=%(job)s %(message)s"}},
                   "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "app",
                                            "stream": "ext://sys.stdout"}},
                   "root": {"handlers": ["console"], "level": "INFO"}}
    """,
    "shop/__init__.py": "",
    "shop/models.py": """
        from django.db import models
        from django.db.models.signals import post_save
        from django.dispatch import receiver

        from shop import jobs


        class Order(models.Model):
            status = models.CharField(max_length=20, default="new")


        @receiver(post_save, sender=Order)
        def queue_processing(sender, instance, created, **kwargs):
            if created:
                jobs.process_order.enqueue(instance.pk)
    """,
    # the whole recipe: no django.setup() here
    "shop/jobs.py": """
        import logging
        import warnings

        from django.db import connection

        from worker import job

        log = logging.getLogger(__name__)
        with warnings.catch_warnings():  # "accessing the database during app initialization is discouraged"
            warnings.simplefilter("ignore")
            connection.ensure_connection()  # an app that touches the database at import (in the fork server)


        @job(queue="django21")
        def process_order(order_id):
            from shop.models import Order
            fresh = connection.connection is None  # the fork server closed its connection before the fork
            Order.objects.filter(pk=order_id).update(status="processed" if fresh else "shared-connection")
            log.info("processed order %s", order_id)
    """,
}


def test_django_signal_enqueues_and_the_worker_updates_the_orm(env, tmp_path):
    project = tmp_path / "django_app"
    _write(project, DJANGO)
    settings = {"DJANGO_SETTINGS_MODULE": "mysite.settings", "KEY_PREFIX": "django21"}
    _run(project, env, ["manage.py", "check"], **settings)  # models.py imports jobs.py: no reentrant populate()
    _run(project, env, ["manage.py", "migrate", "--run-syncdb", "-v", "0"], **settings)
    made = _run(project, env, ["manage.py", "shell", "-c",
                               "from shop.models import Order; print(Order.objects.create().pk)"], **settings)
    pk = int(made.stdout.strip().splitlines()[-1])
    worker = _run(project, env, ["-m", "worker", "--burst"], JOB_MODULES="shop.jobs", QUEUES="django21",
                  LOG_LEVEL="INFO", **settings)
    with sqlite3.connect(project / "db.sqlite3") as db:
        assert db.execute("SELECT status FROM shop_order WHERE id = ?", (pk,)).fetchone() == ("processed",), \
            worker.stdout + worker.stderr
    line = next(x for x in worker.stdout.splitlines() if "processed order" in x)
    assert line.startswith("DJANGOLOG job=") and "job=-" not in line, line


FLASK = {
    "flaskapp/__init__.py": """
        from flask import Flask, request


        def create_app():
            app = Flask(__name__)
            app.config["OUTBOX"] = None

            @app.post("/signup")
            def signup():
                from flaskapp.jobs import send_welcome
                return {"job": send_welcome.enqueue(request.json["email"], request.json["outbox"])}

            return app
    """,
    "flaskapp/jobs.py": """
        from pathlib import Path

        from flask import current_app

        from worker import job


        @job(queue="flask21")
        def send_welcome(email, outbox):
            from flaskapp import create_app
            with create_app().app_context():
                Path(outbox).write_text(f"welcome {email} from {current_app.name}")
    """,
}


def test_flask_request_enqueues_and_the_worker_runs_the_job_in_an_app_context(env, tmp_path):
    project = tmp_path / "flask_app"
    _write(project, FLASK)
    outbox = tmp_path / "outbox.txt"
    common = {"KEY_PREFIX": "flask21"}
    made = _run(project, env, ["-c", "import json; from flaskapp import create_app\n"
                               "c = create_app().test_client()\n"
                               f"res = c.post('/signup', json={{'email': 'a@example.com', 'outbox': {str(outbox)!r}}})\n"
                               "print(json.dumps(res.get_json()))"], **common)
    job_id = json.loads(made.stdout.strip().splitlines()[-1])["job"]
    worker = _run(project, env, ["-m", "worker", "--burst"], JOB_MODULES="flaskapp.jobs", QUEUES="flask21", **common)
    assert outbox.read_text() == "welcome a@example.com from flaskapp", worker.stdout + worker.stderr
    assert job_id in worker.stdout
