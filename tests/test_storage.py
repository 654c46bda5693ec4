import numpy as np
import pytest

from advdetect.run.storage import atomic_write, load_arrays, read_json, save_arrays, write_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"v": 1})

    def broken(handle):
        handle.write(b'{"v": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, broken)
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_arrays_round_trip_without_pickles(tmp_path):
    save_arrays(tmp_path / "a.npz", x=np.arange(3.0), fooled=np.array([True, False]))
    loaded = load_arrays(tmp_path / "a.npz")
    assert loaded["x"].tolist() == [0.0, 1.0, 2.0] and loaded["fooled"].dtype == bool
    save_arrays(tmp_path / "b.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_arrays(tmp_path / "b.npz")
