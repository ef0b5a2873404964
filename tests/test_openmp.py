"""idefics2.openmp: one thread can be made single-threaded in torch without touching the others."""

import threading

import pytest
import torch

from idefics2.openmp import run_in_short_lived_thread, use_one_openmp_thread


def _in_thread(fn):
    out = {}
    thread = threading.Thread(target=lambda: out.update(value=fn()))
    thread.start()
    thread.join()
    return out["value"]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch with 2+ intra-op threads")
def test_one_thread_is_limited_and_the_others_are_not():
    before = torch.get_num_threads()

    def limited():
        ok = use_one_openmp_thread()
        x = torch.randn(256, 256)
        torch.mm(x, x)  # still works, single-threaded
        return ok, torch.get_num_threads()

    ok, inside = _in_thread(limited)
    if not ok:
        pytest.skip("torch does not use libgomp here")
    assert inside == 1
    assert torch.get_num_threads() == before  # the calling thread is untouched
    assert _in_thread(torch.get_num_threads) == before  # and so are new threads


def test_short_lived_thread_returns_and_raises():
    assert run_in_short_lived_thread(lambda a, b=0: a + b, 2, b=3) == 5
    assert run_in_short_lived_thread(threading.current_thread) is not threading.current_thread()
    with pytest.raises(ValueError, match="boom"):
        run_in_short_lived_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))
