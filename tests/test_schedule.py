"""The learning-rate schedule and time-budget planning, as the pure functions they are."""
import pytest

from textgen.training import schedule


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


def test_the_time_budget_is_one_object_whose_state_dict_resumes_it():
    """TimeBudget holds the whole state: timed after the warm-up, planned once, timed again at a tenth,
    four tenths and seven tenths, and its state_dict() the checkpoint's keys, which restore it."""
    same = lambda value: value  # noqa: E731  (one process: every rank agrees)
    budget = schedule.TimeBudget.start(100.0, 1_000_000)
    assert not budget.planned and budget.replans == 0
    start = schedule.timing_starts_at(warmup_steps=10)
    assert not budget.first_plan_due(start, 1.0, 10)                     # the mark is set here
    assert not budget.first_plan_due(start + schedule.TIMED_STEPS - 1, 2.9, 10)
    assert budget.first_plan_due(start + schedule.TIMED_STEPS, 3.0, 10)
    seconds = budget.make_plan(start + schedule.TIMED_STEPS, 3.0, 0.5, 0, same)
    assert seconds == (3.0 - 1.0) / schedule.TIMED_STEPS and budget.planned
    assert budget.plan == schedule.planned_steps(start + 20, 3.0, 100.0, seconds, 0.5, 0, budget.validations)
    assert budget.retime(start + 20, 3.0, 2.0, 0, same) is None         # marks where the next timing starts
    step = int(schedule.REPLAN_AT[0] * budget.plan) + schedule.TIMED_STEPS + start + 20
    old_plan = budget.plan
    timed = budget.retime(step, 3.0 + 0.05 * (step - start - 20), 2.0 + 0.05 * (step - start - 20), 0, same)
    assert timed is not None and timed[2] == old_plan and budget.replans == 1
    saved = budget.state_dict()
    assert set(saved) == {"plan", "planned", "replans", "validations", "eval_seconds"}
    again = schedule.TimeBudget.start(100.0, 1_000_000)
    again.load_state_dict(saved, 1_000_000)
    assert again.state_dict() == saved and again.first_mark is None     # a resumed run times afresh
    fixed = schedule.TimeBudget.start(None, 500)
    fixed.load_state_dict({"plan": 300}, 800)
    assert fixed.plan == 800 and fixed.planned                          # no budget: the (new) --steps
