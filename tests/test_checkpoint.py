"""Checkpoints and exports that are half-written are never picked up."""

from compress.checkpoint import complete_steps, latest_step, mark_complete, publish_dir, step_tag


def _fake_ckpt(root, step, complete=True):
    d = root / step_tag(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        mark_complete(root, step, keep=10)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    assert latest_step(tmp_path / "missing") is None
    _fake_ckpt(tmp_path, 10)
    _fake_ckpt(tmp_path, 20, complete=False)  # killed while saving
    assert latest_step(tmp_path) == 10


def test_keep_prunes_old_and_half_written(tmp_path):
    _fake_ckpt(tmp_path, 5, complete=False)
    for s in (10, 20, 30):
        _fake_ckpt(tmp_path, s)
    mark_complete(tmp_path, 30, keep=2)
    assert complete_steps(tmp_path) == [20, 30]
    assert not (tmp_path / step_tag(5)).exists()


def test_publish_dir_replaces_whole(tmp_path):
    final = tmp_path / "final"
    final.mkdir()
    (final / "old.txt").write_text("old")
    tmp = tmp_path / "final.tmp"
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    publish_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert not tmp.exists() and not (tmp_path / "final.old").exists()
