"""`draftloop up` splits the CPU between the server and the worker."""

from service.config import Settings
from service.stack import thread_envs


def test_cpu_threads_are_split_between_server_and_worker(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    envs = thread_envs(Settings(device="cpu"), cpus=8)
    assert envs == {"server": {"OMP_NUM_THREADS": "4"}, "worker": {"OMP_NUM_THREADS": "4"}}
    assert thread_envs(Settings(device="cpu"), cpus=1)["worker"] == {"OMP_NUM_THREADS": "1"}


def test_an_explicit_thread_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_envs(Settings(device="cpu"), cpus=8) == {}
