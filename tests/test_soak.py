"""The soak benchmark's measurements and targets (benchmarks/soak.py; the soak itself is not a test)."""

from torch.utils.tensorboard import SummaryWriter

from benchmarks.soak import RecipeResult, Sample, check, sample, tensorboard_state


def test_sample_counts_an_open_writer_until_it_closes(tmp_path):
    before = sample(0)
    assert before.rss_mib > 0 and before.fds > 0 and before.threads >= 1
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("x", 1.0, 0)
    during = tensorboard_state()
    assert during["open_writers"] == before.open_writers + 1
    assert during["writer_threads"] == before.writer_threads + 1
    writer.close()
    after = tensorboard_state()
    assert (after["open_writers"], after["writer_threads"]) == (before.open_writers, before.writer_threads)
    assert after["summary_writers"] == before.summary_writers + 1  # closed, still referenced here
    del writer
    assert sample(1).summary_writers == before.summary_writers


def _sample(step: int, rss: float, fds: int = 5, writers: int = 1) -> Sample:
    return Sample(step, rss, fds, 0, writers, writers, writers, 1 + writers)


def test_check_names_each_missed_target():
    ok = RecipeResult(
        "r", 200, 100, [_sample(0, 90.0), _sample(100, 100.0), _sample(200, 104.0)],
        _sample(0, 80.0, writers=0), _sample(200, 104.0, writers=0), _sample(200, 104.0, writers=0), "", 1.0,
    )
    assert check(ok, 5.0) == []
    grown = RecipeResult(
        "r", 200, 100, [_sample(0, 90.0), _sample(100, 100.0), _sample(200, 106.0, fds=7)],
        _sample(0, 80.0, writers=0), _sample(200, 106.0, fds=6), _sample(200, 106.0), "", 1.0,
    )
    missed = " | ".join(check(grown, 5.0))
    for words in ("RSS grew 6.0%", "open files grew from 5", "still open after fit", "1 more open files",
                  "1 SummaryWriter(s) alive"):
        assert words in missed
