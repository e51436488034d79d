"""Backward simulation of few-step students (docs/objectives.md §3.1): the sample, its gradient, the step count,
the random times, and one-time students left exactly as they were."""

from collections import Counter

import pytest
import torch

from fdistill.containers import Batch
from fdistill.errors import ConfigError
from fdistill.networks.denoisers import MLPDenoiser
from fdistill.networks.generator import Generator, renoise
from fdistill.objectives import OBJECTIVES, common
from fdistill.recipes import load_config
from fdistill.run import build_experiment
from fdistill.schedules import DiscreteVPSchedule
from tests.helpers import TINY_UNET, ring_experiment

SCORE_OBJECTIVES = ["dmd", "f_distill", "diff_instruct", "sid", "sim", "uni_instruct"]
RING_TIMES = "generator.times=[80.0,5.0,1.0,0.2]"  # EDM sigmas of the analytic ring teacher
TRIGFLOW_TIMES = "generator.times=[1.5,1.2,0.8,0.4]"
CHI2_3DOF_999 = 16.27  # 99.9% quantile of chi-square with 3 degrees of freedom


def ring_batch(size=16):
    return Batch(size=size, real=torch.randn(size, 2))


def chi_square(counts: Counter, values) -> float:
    expected = sum(counts.values()) / len(values)
    return sum((counts[v] - expected) ** 2 / expected for v in values)


def record_simulations(monkeypatch) -> list[dict]:
    """Every call of :meth:`Generator.backward_simulation`: its step count, time mode and sample."""
    calls, simulate = [], Generator.backward_simulation

    def recorded(self, z, cond=None, steps=1, generator=None, random_times=False):
        x_g = simulate(self, z, cond, steps, generator, random_times)
        calls.append({"steps": steps, "random_times": random_times, "x_g": x_g})
        return x_g

    monkeypatch.setattr(Generator, "backward_simulation", recorded)
    return calls


def simulated_steps(objective, nets, monkeypatch, steps=12):
    """``(step, kind, simulation)`` of training steps ``0..steps-1``: each step's loss is finite and comes from
    exactly one backward simulation, whose sample carries gradient in generator steps only."""
    calls = record_simulations(monkeypatch)
    for step in range(steps):
        kind = objective.step_kind(step)
        torch.manual_seed(step)
        loss, _ = (objective.generator_loss if kind == "generator" else objective.critic_loss)(ring_batch(), nets, step)
        call = calls.pop()
        assert not calls
        assert call["x_g"].requires_grad == (kind == "generator")
        assert torch.isfinite(loss)
        yield step, kind, call


# ------------------------------------------------------------------------------------------------ the sample


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_simulated_sample_is_the_students_k_step_sample(steps):
    nets, _ = ring_experiment("dmd", RING_TIMES)
    batch = ring_batch()
    torch.manual_seed(7)
    x_g = common.backward_simulation_samples(batch, nets, steps)
    torch.manual_seed(7)
    expected = nets.student.sample(nets.student.noise(batch.size), steps=steps)
    assert torch.equal(x_g, expected)


def test_random_time_sample_is_the_students_sample_at_the_drawn_times():
    nets, _ = ring_experiment("dmd", RING_TIMES)
    student, batch = nets.student, ring_batch()
    torch.manual_seed(7)
    x_g = common.backward_simulation_samples(batch, nets, 4, "random")
    torch.manual_seed(7)
    z = student.noise(16)
    times = student.random_times(4)
    assert times != student.times
    assert torch.equal(x_g, student.sample_at(z, times))


@pytest.mark.parametrize("name", SCORE_OBJECTIVES)
def test_generator_step_sample_is_the_k_step_sample(name, monkeypatch):
    nets, objective = ring_experiment(name, RING_TIMES)
    calls = record_simulations(monkeypatch)
    step = next(s for s in range(1, 100) if objective.step_kind(s) == "generator"
                and common.uniform_simulation_steps(s, 4) == 3)
    batch = ring_batch()
    torch.manual_seed(11)
    objective.generator_loss(batch, nets, step)
    assert [c["steps"] for c in calls] == [3]
    with torch.no_grad():
        torch.manual_seed(11)
        expected = nets.student.sample(nets.student.noise(16), steps=3)
    assert torch.equal(calls[0]["x_g"], expected)


# ------------------------------------------------------------------------------------------------ the gradient


def test_gradient_reaches_the_student_through_the_last_step_only():
    nets, _ = ring_experiment("dmd", RING_TIMES)
    student, times, steps = nets.student, nets.student.times, 3
    weights = torch.randn(16, 2)

    def gradient(sample):
        student.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        (sample() * weights).sum().backward()
        return [p.grad.clone() for p in student.parameters()]

    def last_step_on_a_detached_input():
        z = student.noise(16)
        with torch.no_grad():
            x0 = student.sample(z, steps=steps - 1)
        x = renoise(student.schedule, x0, x0, times[steps - 2], times[steps - 1]).detach()
        return student.step(x, times[steps - 1])

    simulated = gradient(lambda: student.backward_simulation(student.noise(16), steps=steps))
    last_only = gradient(last_step_on_a_detached_input)
    every_step = gradient(lambda: student.sample(student.noise(16), steps=steps))
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(simulated, last_only, strict=True))
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(simulated, every_step, strict=True))


@pytest.mark.parametrize("name", SCORE_OBJECTIVES)
@pytest.mark.parametrize("times", ["fixed", "random"])
def test_critic_and_generator_steps_both_simulate_the_step_count_of_their_step(name, times, monkeypatch):
    nets, objective = ring_experiment(name, RING_TIMES, f"objective.backward_simulation_times={times}")
    kinds = set()
    for step, kind, call in simulated_steps(objective, nets, monkeypatch):
        assert call["steps"] == common.uniform_simulation_steps(step, 4)
        assert call["random_times"] == (times == "random")
        kinds.add(kind)
    assert kinds == {"critic", "generator"}


# ------------------------------------------------------------------------------------------------ the step count


def test_step_count_is_uniform_over_steps_and_one_for_a_one_time_student():
    draws = [common.uniform_simulation_steps(step, 4) for step in range(4000)]
    counts = Counter(draws)
    assert set(counts) == {1, 2, 3, 4}
    assert chi_square(counts, [1, 2, 3, 4]) < CHI2_3DOF_999
    generator_steps = Counter(draws[4::5])  # DMD's generator steps (critic_steps = 4)
    assert chi_square(generator_steps, [1, 2, 3, 4]) < CHI2_3DOF_999
    successive = Counter(zip(draws, draws[1:], strict=False))  # not a cycle: every pair of successive counts
    assert len(successive) == 16
    assert {common.uniform_simulation_steps(step, 1) for step in range(100)} == {1}


def test_step_count_leaves_torch_random_stream_alone():
    torch.manual_seed(0)
    common.uniform_simulation_steps(5, 4)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_rcm_cycles_through_the_step_counts(monkeypatch):
    nets, objective = ring_experiment("rcm", TRIGFLOW_TIMES, "objective.tangent_warmup=0")
    calls = record_simulations(monkeypatch)
    assert [common.cyclic_simulation_steps(n, 4) for n in range(6)] == [1, 2, 3, 4, 1, 2]
    observed = {"generator": [], "critic": []}
    for step in range(16):
        kind = objective.step_kind(step)
        torch.manual_seed(step)
        (objective.generator_loss if kind == "generator" else objective.critic_loss)(ring_batch(), nets, step)
        observed[kind].append(calls.pop()["steps"])
    for kind, counts in observed.items():
        assert counts == [n % 4 + 1 for n in range(len(counts))], kind
    assert len(observed["critic"]) >= 5


@pytest.mark.parametrize("name", [*SCORE_OBJECTIVES, "rcm"])
def test_last_simulates_all_k_steps_in_critic_and_generator_steps(name, monkeypatch):
    """``backward_simulation_steps: last``: critic and generator steps alike draw the K-step sampler's samples,
    so the fake score tracks that sampler's law rather than the mixture over step counts."""
    times = TRIGFLOW_TIMES if name == "rcm" else RING_TIMES
    nets, objective = ring_experiment(name, times, "objective.backward_simulation_steps=last",
                                      *(["objective.tangent_warmup=0"] if name == "rcm" else []))
    kinds = set()
    for step, kind, call in simulated_steps(objective, nets, monkeypatch):
        assert call["steps"] == 4, (name, step)
        kinds.add(kind)
    assert kinds == {"critic", "generator"}


# ------------------------------------------------------------------------------------------------ random times


def test_random_times_keep_t0_and_stay_in_their_strata():
    nets, _ = ring_experiment("dmd", RING_TIMES)
    student = nets.student
    bounds = [*student.times, student.schedule.t_min]
    torch.manual_seed(0)
    draws = [student.random_times(4) for _ in range(2000)]
    assert all(len(times) == 4 and times[0] == 80.0 for times in draws)
    for i in range(1, 4):
        column = torch.tensor([times[i] for times in draws], dtype=torch.float64)
        lo, hi = bounds[i + 1], bounds[i]
        assert bool((column > lo).all() and (column <= hi).all())
        assert abs(float(column.mean()) - (lo + hi) / 2) < 0.05 * (hi - lo)  # uniform in its stratum
    assert all(a > b for times in draws for a, b in zip(times, times[1:], strict=False))
    assert [len(student.random_times(k)) for k in (1, 2, 3)] == [1, 2, 3]


def discrete_student(times):
    alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 10, dtype=torch.float64), 0)
    return Generator(MLPDenoiser(2, DiscreteVPSchedule(alphas_cumprod), hidden=8, depth=1), times)


def test_random_times_on_a_discrete_schedule_are_uniform_integer_timesteps():
    student = discrete_student([9.0, 6.0, 3.0, 1.0])
    torch.manual_seed(0)
    draws = [student.random_times(4) for _ in range(3000)]
    assert all(t == int(t) for times in draws for t in times)
    strata = {1: [4, 5, 6], 2: [2, 3], 3: [1]}  # the integers in (t_{i+1}, t_i], t_4 = t_min = 0
    for i, values in strata.items():
        counts = Counter(int(times[i]) for times in draws)
        assert sorted(counts) == values
        assert all(abs(counts[v] / len(draws) - 1 / len(values)) < 0.04 for v in values)


def test_random_times_on_a_discrete_schedule_need_integer_times():
    with pytest.raises(ValueError, match="integer generator.times"):
        discrete_student([9.0, 6.5]).random_times(2)


def test_random_times_of_a_diffusers_student_are_timesteps_the_stock_scheduler_takes():
    cfg, options = load_config(None, ["teacher.kind=unet", "objective.name=dmd", "generator.times=[999,749,499,249]",
                                      "objective.backward_simulation_times=random"])
    cfg.teacher.unet = dict(TINY_UNET)
    torch.manual_seed(0)
    nets, objective, _ = build_experiment(cfg, options)
    student = nets.student
    assert student.stock is not None
    for _ in range(50):
        times = student.random_times(4)
        student.stock.check_times(times)
        assert times[0] == 999 and 749 >= times[1] > 499 >= times[2] > 249 >= times[3] > 0
    step = next(s for s in range(100) if common.uniform_simulation_steps(s, 4) == 4)
    batch = Batch(size=2, real=torch.randn(2, 3, 8, 8))
    loss, _ = (objective.generator_loss if objective.step_kind(step) == "generator" else objective.critic_loss)(
        batch, nets, step)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", [*SCORE_OBJECTIVES, "rcm"])
def test_unknown_backward_simulation_times_are_rejected(name):
    times = [TRIGFLOW_TIMES] if name == "rcm" else []
    overrides = [f"objective.name={name}", *times, "objective.backward_simulation_times=sometimes"]
    cfg, options = load_config(None, overrides)
    with pytest.raises(ConfigError, match="backward_simulation_times must be fixed or random"):
        build_experiment(cfg, options)


def test_unknown_backward_simulation_steps_are_rejected():
    cfg, options = load_config(None, ["objective.name=dmd", "objective.backward_simulation_steps=first"])
    with pytest.raises(ConfigError, match="backward_simulation_steps must be every or last"):
        build_experiment(cfg, options)


def test_backward_simulation_defaults_to_fixed_times_and_every_step_count():
    for name, (_, options) in OBJECTIVES.items():
        if name != "scm":
            assert options().backward_simulation_times == "fixed", name
            assert options().backward_simulation_steps == "every", name


# ------------------------------------------------------------------------------------------------ one time


def one_step_samples(batch, nets, step, options):
    """What every score-distillation objective drew before backward simulation: one call on fresh noise."""
    return nets.student(nets.student.noise(batch.size, device=nets.device), batch.cond)


@pytest.mark.parametrize("name", SCORE_OBJECTIVES)
@pytest.mark.parametrize("times", ["fixed", "random"])
def test_a_one_time_student_trains_exactly_as_before(name, times, monkeypatch):
    overrides = [f"objective.backward_simulation_times={times}"]
    if name in ("dmd", "sid"):
        overrides.append("objective.gan_weight=0.01")
    nets, objective = ring_experiment(name, *overrides)
    assert nets.student.max_steps == 1
    batch = ring_batch()

    def losses():
        values = []
        for step in range(6):
            loss_fn = objective.generator_loss if objective.step_kind(step) == "generator" else objective.critic_loss
            torch.manual_seed(100 + step)
            values.append(loss_fn(batch, nets, step)[0].detach())
        return values

    now = losses()
    one_step_calls = []

    def recorded_one_step_samples(*args):
        one_step_calls.append(args[2])
        return one_step_samples(*args)

    monkeypatch.setattr(common, "student_samples", recorded_one_step_samples)
    before = losses()
    assert one_step_calls == list(range(6))
    assert all(torch.equal(a, b) for a, b in zip(now, before, strict=True))
