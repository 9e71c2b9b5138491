"""Mount the dashboard in a Django project with a URL include::

    # urls.py
    from django.contrib.admin.views.decorators import staff_member_required  # or any check of your own
    from worker.web import make_app
    from worker.web.django import urls

    dashboard = make_app(authorize=lambda environ: environ["worker.web.request"].user.is_staff)
    urlpatterns = [..., path("ops/jobs/", include(urls(dashboard)))]

The Django request is in the WSGI environ as ``worker.web.request``, so ``authorize`` can use the session, the user
and its permissions. The view is exempt from Django's CSRF middleware because the dashboard checks its own token
and the request's origin on every POST (docs/dashboard.md).
"""
from __future__ import annotations

from django.http import HttpResponse
from django.urls import re_path
from django.views.decorators.csrf import csrf_exempt


def urls(app) -> list:
    """URL patterns serving ``app`` (a :class:`worker.web.Dashboard`) under wherever they are included."""

    @csrf_exempt
    def view(request, rest=""):
        environ = dict(request.META)
        full = request.path_info
        prefix = full[: len(full) - len(rest)].rstrip("/") if rest else full.rstrip("/")
        environ.update({"SCRIPT_NAME": request.META.get("SCRIPT_NAME", "").rstrip("/") + prefix,
                        "PATH_INFO": "/" + rest, "wsgi.input": _Body(request.body),
                        "CONTENT_LENGTH": str(len(request.body)), "worker.web.request": request})
        out = {}

        def start_response(status, headers, exc_info=None):
            out["status"], out["headers"] = status, headers
        body = b"".join(app(environ, start_response))
        res = HttpResponse(body, status=int(out["status"][:3]))
        for k, v in out["headers"]:
            if k.lower() == "set-cookie":
                name, _, rest_ = v.partition("=")
                value, *attrs = rest_.split(";")
                res.set_cookie(name, value, path=_attr(attrs, "Path") or "/", httponly=True, samesite="Strict",
                               secure=any(a.strip().lower() == "secure" for a in attrs))
            else:
                res[k] = v
        return res

    return [re_path(r"^(?P<rest>.*)$", view)]


class _Body:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, n=-1):
        out, self.data = (self.data, b"") if n is None or n < 0 else (self.data[:n], self.data[n:])
        return out


def _attr(attrs, name):
    for a in attrs:
        k, _, v = a.strip().partition("=")
        if k.lower() == name.lower():
            return v
    return None
