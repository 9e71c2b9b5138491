"""An app that reconfigures logging at import, as Django's LOGGING does (tests/test_job_api.py, issue 21)."""
import logging
import sys

from worker import job
from tests.jobs import r

logging.basicConfig(force=True, stream=sys.stdout, level=logging.INFO,
                    format="APPFMT job=%(job)s name=%(job_name)s %(message)s")
log = logging.getLogger("tests.jobs_logconfig")
log.info("imported")  # outside a job: %(job)s is "-", not a formatting error


@job
def logconfig_job(text):
    log.info("app says %s", text)
    r().rpush("logconfig_job", "done")
