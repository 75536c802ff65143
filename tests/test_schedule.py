"""The learning-rate schedule and time-budget planning, as the pure functions they are."""
import pytest

from textgen import schedule


def test_warm_up_is_linear_and_the_cosine_ends_at_the_floor():
    lrs = [schedule.lr_at(step, 100, 1.0, 10, 0.1) for step in range(101)]
    assert lrs[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert lrs[10] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)                      # halfway down the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))                # never rises after warm-up
    assert schedule.lr_at(150, 100, 1.0, 10, 0.1) == pytest.approx(0.1)   # past the plan: the floor


def test_the_planned_steps_and_their_validations_fit_the_remaining_budget():
    for eval_every in (0, 50):
        plan = schedule.planned_steps(step=30, elapsed=3.0, budget=100.0, seconds_per_step=0.1, eval_seconds=1.5,
                                      eval_every=eval_every)
        evals = schedule.EVALS_PER_RUN if eval_every == 0 else (plan - 30) / eval_every
        assert (plan - 30) * 0.1 + evals * 1.5 <= (1 - schedule.SPARE) * 97.0 + 0.1
        if eval_every == 0:      # with eval_every the count of validations is an upper bound: plans run short
            assert (plan - 30 + 2) * 0.1 + evals * 1.5 > (1 - schedule.SPARE) * 97.0    # and use nearly all of it
    assert schedule.planned_steps(30, 99.0, 100.0, 0.1, 5.0, 0) == 31          # no time left: one more step


def test_a_plan_made_again_late_reserves_only_the_validations_still_to_come():
    # 70% of a 900 s budget gone, 20 s validations: three of the ten remain, not ten.
    plan = schedule.planned_steps(step=700, elapsed=630.0, budget=900.0, seconds_per_step=0.2, eval_seconds=20.0,
                                  eval_every=0)
    assert plan - 700 == int(((1 - schedule.SPARE) * 270.0 - 3 * 20.0) / 0.2)


def test_cheap_validations_come_more_often_within_their_share_of_the_budget():
    assert schedule.validations_for(900.0, 4.9) == schedule.EVALS_PER_RUN      # tiny-shakespeare's 111k-char tail
    assert schedule.validations_for(900.0, 0.5) == 36                          # 2% of 900 s in 0.5 s validations
    assert schedule.validations_for(900.0, 0.01) == schedule.MAX_EVALS_PER_RUN
    assert schedule.validations_for(900.0, 0.0) == schedule.MAX_EVALS_PER_RUN  # too quick to time
    for seconds in (0.01, 0.1, 0.5, 1.0):
        count = schedule.validations_for(900.0, seconds)
        assert count == schedule.EVALS_PER_RUN or count * seconds <= schedule.EVAL_SHARE * 900.0
    # The plan reserves time for as many as will come.
    ten = schedule.planned_steps(30, 3.0, 900.0, 0.1, 0.5, 0, validations=10)
    many = schedule.planned_steps(30, 3.0, 900.0, 0.1, 0.5, 0, validations=36)
    assert ten - many == int(((1 - schedule.SPARE) * 897.0 - 10 * 0.5) / 0.1) - \
        int(((1 - schedule.SPARE) * 897.0 - 36 * 0.5) / 0.1)
    assert schedule.eval_interval(0, 1000, planned=True, validations=40) == 25


def test_validation_waits_for_the_plan_then_comes_ten_times():
    assert schedule.eval_interval(25, 1000, planned=False) == 25
    assert schedule.eval_interval(0, 1_000_000, planned=False) == 1_000_001   # not before the plan exists
    assert schedule.eval_interval(0, 1000, planned=True) == 1000 // schedule.EVALS_PER_RUN
    assert schedule.eval_interval(0, 5, planned=True) == 1
    assert schedule.timing_starts_at(50) == 10 and schedule.timing_starts_at(0) == 2


def test_budget_text_keeps_a_budget_under_a_second():
    assert schedule.seconds_text(900.0) == "900s"
    assert schedule.seconds_text(4.0) == "4s"
    assert schedule.seconds_text(0.5) == "0.5s"     # once "0s", which read as no budget at all
    assert schedule.seconds_text(2.5) == "2.5s"
