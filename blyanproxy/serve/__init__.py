"""The listening side and the process: the site and its request limits, dispatch, drain, workers,
signals and reload."""

from __future__ import annotations

from blyanproxy.serve.admission import AdmissionSettings, build_admission
from blyanproxy.serve.collector import tune_garbage_collector
from blyanproxy.serve.drain import ConnectionTracker, Drainer
from blyanproxy.serve.envfile import load_settings
from blyanproxy.serve.listening import Listener, cannot_listen, with_backlog
from blyanproxy.serve.reload import Reloader
from blyanproxy.serve.signals import ProcessSignals
from blyanproxy.serve.site import ProxySite, RootResource
from blyanproxy.serve.workers import ParentWatch, WorkerRole, WorkerSupervisor, worker_endpoint, worker_role

__all__ = [
    "AdmissionSettings",
    "ConnectionTracker",
    "Drainer",
    "Listener",
    "ParentWatch",
    "ProcessSignals",
    "ProxySite",
    "Reloader",
    "RootResource",
    "WorkerRole",
    "WorkerSupervisor",
    "cannot_listen",
    "build_admission",
    "load_settings",
    "tune_garbage_collector",
    "with_backlog",
    "worker_endpoint",
    "worker_role",
]
