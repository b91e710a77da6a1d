"""The one atomic writer every result, checkpoint, report and download goes through."""
import json
import os
import stat

import pytest

from rome_fast.files import TEMP_PREFIX, atomic_file, atomic_write, remove_stale_temporaries, write_json_atomic


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


def test_atomic_write_gives_an_ordinary_file(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(path, {"a": [1, 2]}, indent=2)
    assert json.loads(path.read_text()) == {"a": [1, 2]} and '\n  "a"' in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_failed_write_leaves_the_old_file(tmp_path, error):
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def half(f):
        f.write(b"new, half of it")
        raise error("stop")

    with pytest.raises(error):
        atomic_write(path, half)
    assert path.read_bytes() == b"old"
    assert not list(tmp_path.glob(TEMP_PREFIX + "*"))


def test_atomic_file_yields_the_temporary_path(tmp_path):
    path = tmp_path / "data.txt"
    with atomic_file(path) as (f, tmp):
        f.write(b"checked before it is renamed")
        f.flush()
        assert tmp.name.startswith(TEMP_PREFIX) and tmp.read_bytes().startswith(b"checked") and not path.exists()
    assert path.read_bytes() == b"checked before it is renamed" and not tmp.exists()


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    """What a killed process leaves (its temporary file) goes; finished files, including ones
    whose names merely contain the prefix, stay; a missing folder is no error."""
    with atomic_file(tmp_path / "kept.json") as (f, tmp):
        f.write(b"{}")
        stale = tmp_path / tmp.name.replace(TEMP_PREFIX, TEMP_PREFIX + "killed-")
        stale.write_bytes(b"half")
    (tmp_path / ("x" + TEMP_PREFIX + "y")).write_bytes(b"not one of ours")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.json", "x" + TEMP_PREFIX + "y"]
    remove_stale_temporaries(tmp_path / "absent")
