"""Process signals: SIGTERM stops the reactor without being re-raised; SIGHUP reloads."""

import signal

from twisted.internet.error import ReactorNotRunning

from blyanproxy.serve.signals import ProcessSignals


class FakeReactor:
    """Runs callWhenRunning/callFromThread calls at once; counts stops (the second one raises)."""

    def __init__(self):
        self.stops = 0
        self._exitSignal = None

    def callWhenRunning(self, f, *args):
        f(*args)

    def callFromThread(self, f, *args):
        f(*args)

    def stop(self):
        self.stops += 1
        if self.stops > 1:
            raise ReactorNotRunning()


def test_handlers_are_installed_once_the_reactor_runs_and_do_their_job():
    reactor, installed, reloads = FakeReactor(), {}, []
    ProcessSignals(reactor, lambda: reloads.append(1), install=installed.__setitem__).startService()
    assert set(installed) == {signal.SIGTERM, signal.SIGHUP}
    installed[signal.SIGHUP](signal.SIGHUP, None)
    assert reloads == [1] and reactor.stops == 0
    installed[signal.SIGTERM](signal.SIGTERM, None)
    installed[signal.SIGTERM](signal.SIGTERM, None)  # a second SIGTERM while stopping is harmless
    assert reactor.stops == 2
    assert reactor._exitSignal is None  # nothing for twistd to re-raise: the exit status is 0
