from mmprof.runners.train_memory import window_steps


def test_window_sized_from_probe_step_with_headroom():
    assert window_steps(0.1, 5, 2.0) == 24          # 1.2 * 2 s / 0.1 s
    assert window_steps(1.0, 5, 2.0) == 5           # the asked steps already fill the window
    assert window_steps(0.0, 7, 2.0) == 7           # an untimed probe leaves the asked steps
