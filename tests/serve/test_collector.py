"""The proxy process tunes the garbage collector once start-up is done."""


from blyanproxy.serve import tune_garbage_collector
from blyanproxy.serve.collector import THRESHOLDS


class RecordingCollector:
    def __init__(self):
        self.calls = []

    def set_threshold(self, *thresholds):
        self.calls.append(("set_threshold", thresholds))

    def freeze(self):
        self.calls.append(("freeze", ()))


def test_it_collects_less_often_and_freezes_what_start_up_made():
    collector = RecordingCollector()
    tune_garbage_collector(collector)
    assert collector.calls == [("set_threshold", THRESHOLDS), ("freeze", ())]
