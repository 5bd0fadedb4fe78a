"""Hub reachability: huggingface_hub's settings first, then one request through its session; only the CLI switches
the process to offline mode."""

import os

import huggingface_hub.constants as hc
import pytest

from llmprune.model import network


class Session:
    def __init__(self, error=None):
        self.error, self.calls = error, []

    def head(self, url, timeout=None):
        self.calls.append((url, timeout))
        if self.error:
            raise self.error
        return object()


@pytest.fixture
def online(monkeypatch):
    """Offline variables unset, the hub's setting False, a fresh probe cache; the CLI switch off afterwards."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    network._probe.cache_clear()
    yield monkeypatch
    network._probe.cache_clear()
    network.allow_process_offline(False)


def _session(monkeypatch, session):
    import huggingface_hub.utils

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: session)


def test_reachable_through_the_hub_session(online):
    s = Session()
    _session(online, s)
    assert network.hub_reachable(timeout=1.5) is True
    assert s.calls == [(hc.ENDPOINT, 1.5)]  # the configured endpoint, through the hub's client (proxies apply)
    assert network.hub_reachable(timeout=1.5) and len(s.calls) == 1  # decided once


def test_unreachable_as_a_library_changes_no_process_setting(online):
    _session(online, Session(ConnectionError("no route")))
    assert network.hub_reachable() is False
    assert "HF_HUB_OFFLINE" not in os.environ and hc.HF_HUB_OFFLINE is False


def test_unreachable_in_the_cli_switches_its_process_offline(online):
    _session(online, Session(TimeoutError("timed out")))
    network.allow_process_offline()
    assert network.hub_reachable() is False
    assert os.environ["HF_HUB_OFFLINE"] == "1" and hc.HF_HUB_OFFLINE is True


def test_offline_by_configuration_sends_no_request(online):
    s = Session()
    _session(online, s)
    online.setenv("TRANSFORMERS_OFFLINE", "1")
    assert network.hub_reachable() is False and s.calls == []
    assert hc.HF_HUB_OFFLINE is True  # a variable set after import is honoured by the hub's setting too
