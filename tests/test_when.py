"""When the training loop logs, evaluates and saves: the pure functions ``run`` asks after every step."""

from __future__ import annotations

from train.config import TrainConfig
from train.loop import checkpoint_now, eval_now, itstime


def _steps(pred, total: int) -> list[int]:
    return [s for s in range(1, total + 1) if pred(s)]


def test_itstime_at_each_multiple_and_the_last_step():
    assert _steps(lambda s: itstime(s, 4, 10), 10) == [4, 8, 10]
    assert _steps(lambda s: itstime(s, 0, 10), 10) == [10]  # 0: only the last
    assert _steps(lambda s: itstime(s, 1, 3), 3) == [1, 2, 3]


def test_evaluation_at_epoch_ends_or_every_n_steps_and_at_the_end():
    cfg = TrainConfig()  # eval_every_steps 0: at each epoch's end
    assert _steps(lambda s: eval_now(s, cfg, 4, 10), 10) == [4, 8, 10]
    cfg.eval_every_steps = 3
    assert _steps(lambda s: eval_now(s, cfg, 4, 10), 10) == [3, 6, 9, 10]
    cfg.eval.enabled = False
    assert _steps(lambda s: eval_now(s, cfg, 4, 10), 10) == []


def test_checkpoints_by_count_epoch_end_evaluation_preemption_and_the_end():
    cfg = TrainConfig(checkpoint_every_steps=5)

    def at(evaluated=(), preempted=()):
        return _steps(lambda s: checkpoint_now(s, cfg, 4, 12, evaluated=s in evaluated, preempted=s in preempted), 12)

    assert at() == [4, 5, 8, 10, 12]
    assert at(evaluated=(3,), preempted=(7,)) == [3, 4, 5, 7, 8, 10, 12]
    cfg.checkpoint_every_steps = 0  # epoch ends and the end only
    assert at() == [4, 8, 12]
