"""The levelling's per-step arrays on disk (``services/mixer/steps.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from services.mixer.steps import StepFile


@pytest.mark.parametrize("coarse", ["", "nearest", "up"])
def test_steps_come_back_by_range_exactly_or_within_a_bfloat16_step(tmp_path, coarse):
    rng = np.random.default_rng(4)
    values = (10.0 ** rng.uniform(-12, 1, 10_000)).astype(np.float32)  # energies and peaks span decades
    steps = StepFile(str(tmp_path), coarse)
    for lo in range(0, values.shape[0], 999):
        steps.append(values[lo : lo + 999])
    got = np.concatenate([steps.read(a, a + 1234) for a in range(0, steps.length, 1234)])
    assert steps.read(9_990, 20_000).shape == (10,) and steps.read(-5, 0).shape == (0,)
    steps.close()
    if not coarse:
        assert np.array_equal(got, values)
        return
    relative = got / values - 1.0
    assert np.abs(relative).max() <= 2.0**-7 * (1 if coarse == "up" else 0.5) + 1e-9
    if coarse == "up":  # a peak never reads low
        assert (got >= values).all()
    else:  # unbiased: the loudness summed from them does not drift
        assert abs(relative.mean()) < 1e-4 and (relative < 0).any() and (relative > 0).any()
    again = StepFile(str(tmp_path), coarse)  # what is already coarse stays as it is
    again.append(got)
    assert np.array_equal(again.read(0, again.length), got)
    again.close()


def test_a_coarse_file_takes_half_the_disk(tmp_path):
    fine, coarse = StepFile(str(tmp_path)), StepFile(str(tmp_path), "nearest")
    for steps in (fine, coarse):
        steps.append(np.ones(6_000, dtype=np.float32))
        steps._file.flush()
    assert coarse._file.tell() * 2 == fine._file.tell() == 24_000
