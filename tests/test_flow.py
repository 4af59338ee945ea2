"""The shared module against closed forms, brute force and statistics."""
import errno
import itertools
import json
import math
import os

import pytest
import torch

import flow

# ---------------------------------------------------------------------------------------------
# Interpolant, target, loss, time.


def test_interpolant_matches_closed_form_and_its_derivative_is_the_target():
    x0, x1 = torch.randn(5, 3, 2), torch.randn(5, 3, 2)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], requires_grad=True)
    x_t = flow.interpolate(x0, x1, t)
    for i, ti in enumerate(t.tolist()):
        torch.testing.assert_close(x_t[i], (1 - ti) * x0[i] + ti * x1[i])
    torch.testing.assert_close(x_t[0], x0[0]), torch.testing.assert_close(x_t[-1], x1[-1])
    # d x_t / dt, coordinate by coordinate, equals u = x1 - x0.
    derivative = torch.autograd.grad(x_t[:, 1, 0].sum(), t)[0]
    torch.testing.assert_close(derivative, flow.target_velocity(x0, x1)[:, 1, 0])


def test_loss_is_zero_for_the_oracle_and_the_mean_square_target_for_zero():
    x0, x1 = torch.randn(64, 4), torch.randn(64, 4)
    oracle = lambda x, t, cond: cond  # cond carries the true target here
    assert flow.flow_matching_loss(oracle, x0, x1, x1 - x0).item() < 1e-12
    zero = lambda x, t, cond: torch.zeros_like(x)
    loss = flow.flow_matching_loss(zero, x0, x1, None)
    assert loss.item() == pytest.approx((x1 - x0).pow(2).mean().item(), rel=1e-6)


def test_loss_sees_x_t_on_the_straight_line_at_the_sampled_time():
    x0, x1 = torch.zeros(8, 2), torch.ones(8, 2)
    seen = {}

    def model(x, t, cond):
        seen["x"], seen["t"] = x, t
        return torch.zeros_like(x)

    flow.flow_matching_loss(model, x0, x1, None)
    torch.testing.assert_close(seen["x"], seen["t"][:, None].expand(8, 2))
    given = torch.linspace(0, 1, 8)
    flow.flow_matching_loss(model, x0, x1, None, t=given)  # a time drawn per example by the caller
    assert seen["t"] is given and torch.equal(seen["x"], given[:, None].expand(8, 2))


def test_time_schedules():
    torch.manual_seed(0)
    uniform = flow.sample_time(100_000)
    assert 0 <= uniform.min() and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 0.005
    logit = torch.logit(flow.sample_time(100_000, "logit-normal").double())
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02  # logit(t) ~ N(0, 1)
    with pytest.raises(ValueError, match="unknown time schedule"):
        flow.sample_time(3, "cosine")


# ---------------------------------------------------------------------------------------------
# Samplers against analytic velocity fields.


def test_euler_is_exact_for_a_constant_field_and_takes_exactly_n_steps():
    velocity = lambda x, t: torch.full_like(x, 2.0)  # x(1) = x0 + 2
    for nfe in (1, 3, 8):
        solution = flow.solve(velocity, torch.zeros(4, 2), nfe, "euler", trajectory=True)
        torch.testing.assert_close(solution.x, torch.full((4, 2), 2.0))  # N + 1 steps would give 2 + 2/N
        assert solution.nfe == nfe and len(solution.trajectory) == nfe + 1
        torch.testing.assert_close(solution.trajectory[:, 0, 0], torch.linspace(0, 2, nfe + 1))


def test_midpoint_is_exact_for_a_field_linear_in_time_and_euler_is_not():
    velocity = lambda x, t: (1.0 + 6.0 * t)[:, None].expand_as(x)  # x(1) = x0 + 1 + 3
    for steps in (1, 2, 5):
        midpoint = flow.solve(velocity, torch.zeros(3, 1), 2 * steps, "midpoint")
        torch.testing.assert_close(midpoint.x, torch.full((3, 1), 4.0))
        assert midpoint.nfe == 2 * steps
        euler = flow.solve(velocity, torch.zeros(3, 1), steps, "euler").x
        # Left Riemann sum of 1 + 6t misses 6 * h / 2 = 3 / N.
        torch.testing.assert_close(euler, torch.full((3, 1), 4.0 - 3.0 / steps))


@pytest.mark.parametrize("solver, order", [("euler", 1), ("midpoint", 2)])
def test_convergence_order_on_exponential_growth(solver, order):
    velocity = lambda x, t: x  # x(1) = e * x0
    x0 = torch.ones(1, 1, dtype=torch.float64)
    per_step = flow.NFE_PER_STEP[solver]
    errors = [abs(flow.solve(velocity, x0, n * per_step, solver).x.item() - math.e) for n in (16, 32, 64)]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(rate - order) < 0.1 for rate in rates), rates


def test_solve_rejects_impossible_budgets_and_unknown_solvers():
    velocity = lambda x, t: x
    with pytest.raises(ValueError, match="NFE=3 is impossible"):
        flow.solve(velocity, torch.zeros(1, 1), 3, "midpoint")
    with pytest.raises(ValueError, match="NFE=0 is impossible"):
        flow.solve(velocity, torch.zeros(1, 1), 0, "euler")
    with pytest.raises(ValueError, match="unknown solver"):
        flow.solve(velocity, torch.zeros(1, 1), 2, "heun")


def test_guidance_combines_branches_on_all_channels():
    calls = []

    def model(x, t, cond):  # v = cond on every channel; the null condition is 0
        calls.append(len(x))
        return cond[:, None].float().expand_as(x)

    x, t = torch.zeros(2, 3), torch.zeros(2)
    cond, null = torch.tensor([1, 2]), torch.tensor([0, 0])
    guided = flow.guided_velocity(model, cond, null, scale=3.0)(x, t)
    torch.testing.assert_close(guided, torch.tensor([[3.0] * 3, [6.0] * 3]))  # 0 + 3 (c - 0)
    assert calls == [4]  # both branches in one batch
    calls.clear()
    plain = flow.guided_velocity(model, cond, null, scale=1.0)(x, t)
    torch.testing.assert_close(plain, torch.tensor([[1.0] * 3, [2.0] * 3]))
    assert calls == [2]


def test_guidance_concatenates_tuple_conditions():
    model = lambda x, t, cond: (cond[0] * cond[1])[:, None].expand_as(x)
    cond, null = (torch.tensor([2.0]), torch.tensor([3.0])), (torch.tensor([1.0]), torch.tensor([1.0]))
    v = flow.guided_velocity(model, cond, null, scale=2.0)(torch.zeros(1, 2), torch.zeros(1))
    torch.testing.assert_close(v, torch.full((1, 2), 1.0 + 2.0 * (6.0 - 1.0)))


# ---------------------------------------------------------------------------------------------
# Couplings against brute force.


def brute_force_cost(x0, x1):
    return min(sum(((x0[p] - x1[i]) ** 2).sum().item() for i, p in enumerate(perm))
               for perm in itertools.permutations(range(len(x1))))


@pytest.mark.parametrize("seed", range(5))
def test_ot_permutation_is_the_brute_force_optimum(seed):
    generator = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(6, 2, 2, generator=generator), torch.randn(6, 2, 2, generator=generator)
    paired = flow.couple(x0, x1, "ot")
    prior_samples = sorted(map(tuple, x0.reshape(6, -1).tolist()))
    assert sorted(map(tuple, paired.reshape(6, -1).tolist())) == prior_samples  # OT only re-orders x0
    assert ((paired - x1) ** 2).sum().item() == pytest.approx(brute_force_cost(x0, x1), rel=1e-6)
    assert flow.transport_cost(paired, x1) <= flow.transport_cost(x0, x1) + 1e-9


def test_grouped_ot_pairs_only_within_groups_and_is_optimal_in_each():
    generator = torch.Generator().manual_seed(0)
    groups = torch.tensor([0, 1, 0, 1, 0, 1, 2, 0])
    x0, x1 = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
    x0[groups == 1] += 10  # a cross-group pairing would be tempting for group 1... and forbidden
    paired = flow.couple(x0, x1, "ot", groups=groups)
    for g in groups.unique():
        members = groups == g
        assert sorted(paired[members].tolist()) == sorted(x0[members].tolist())
        best = brute_force_cost(x0[members], x1[members])
        assert ((paired[members] - x1[members]) ** 2).sum().item() == pytest.approx(best, rel=1e-6)


def test_independent_coupling_keeps_the_draw_and_unknown_coupling_fails():
    x0, x1 = torch.randn(4, 2), torch.randn(4, 2)
    assert flow.couple(x0, x1, "independent") is x0
    with pytest.raises(ValueError, match="unknown coupling"):
        flow.couple(x0, x1, "sinkhorn")


# ---------------------------------------------------------------------------------------------
# Priors, statistically.


def make_classes(n=30_000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=generator)
    centres = torch.tensor([[3.0, 0.0], [0.0, -2.0], [1.0, 1.0]])
    scales = torch.tensor([0.5, 1.0, 2.0])
    return centres[y] + scales[y, None] * torch.randn(n, 2, generator=generator), y, centres, scales


def test_class_means_are_the_per_class_means_streamed_or_not():
    x, y, _, _ = make_classes()
    one_pass = flow.ClassPrior(3, (2,)).to(torch.float64)
    one_pass.accumulate(x, y)
    one_pass.finalize()
    streamed = flow.ClassPrior(3, (2,))
    for xs, ys in zip(x.split(999), y.split(999)):
        streamed.accumulate(xs, ys)
    streamed.finalize()
    for c in range(3):
        expected = x[y == c].double().mean(0)
        torch.testing.assert_close(streamed.means[c].double(), expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(one_pass.means[c], expected, atol=1e-12, rtol=0)


def test_class_prior_samples_have_mean_m_c_and_std_sigma():
    x, y, centres, _ = make_classes()
    prior = flow.ClassPrior(3, (2,), sigma=0.3)
    prior.accumulate(x, y)
    prior.finalize()
    labels = torch.full((40_000,), 2)
    x0 = prior.sample(labels)
    standard_error = 0.3 / math.sqrt(40_000)
    assert (x0.mean(0) - prior.means[2]).abs().max() < 5 * standard_error
    assert (x0.std(0) - 0.3).abs().max() < 0.01
    assert (prior.means - centres).abs().max() < 0.05  # data means are near the true centres


def test_per_class_spread_is_sigma_times_the_class_std():
    x, y, _, scales = make_classes()
    prior = flow.ClassPrior(3, (2,), sigma=0.5, spread="class")
    prior.accumulate(x, y)
    prior.finalize()
    for c in range(3):
        per_dimension_variance = x[y == c].double().var(0, unbiased=False).mean()
        assert prior.stds[c].item() == pytest.approx(0.5 * per_dimension_variance.sqrt().item(), rel=1e-4)
    torch.testing.assert_close(prior.stds, 0.5 * scales, atol=0.02, rtol=0)
    assert prior.sample(torch.full((20_000,), 2)).std(0).sub(1.0).abs().max() < 0.03


def test_class_prior_uses_given_noise_and_round_trips_through_state_dict():
    x, y, _, _ = make_classes(3000)
    prior = flow.ClassPrior(3, (2,), sigma=0.3)
    prior.accumulate(x, y)
    prior.finalize()
    noise = torch.randn(3, 2)
    labels = torch.tensor([0, 1, 2])
    torch.testing.assert_close(prior.sample(labels, noise), prior.means + 0.3 * noise)
    restored = flow.ClassPrior(3, (2,), sigma=0.3)
    restored.load_state_dict(prior.state_dict())
    torch.testing.assert_close(restored.sample(labels, noise), prior.sample(labels, noise))


def test_class_prior_errors_name_the_problem():
    prior = flow.ClassPrior(3, (2,))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        prior.accumulate(torch.zeros(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="does not match prior shape"):
        prior.accumulate(torch.zeros(2, 3), torch.tensor([0, 1]))
    prior.accumulate(torch.zeros(2, 2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"classes \[2\] have no training data"):
        prior.finalize()
    with pytest.raises(ValueError, match="unknown prior spread"):
        flow.ClassPrior(3, (2,), spread="wide")


def test_gaussian_prior_is_standard_normal():
    x0 = flow.GaussianPrior((2, 3)).sample(torch.zeros(50_000))
    assert x0.shape == (50_000, 2, 3)
    assert x0.mean().abs() < 0.01 and (x0.std() - 1).abs() < 0.01
    noise = torch.randn(2, 2, 3)
    torch.testing.assert_close(flow.GaussianPrior((2, 3)).sample((torch.zeros(2), None), noise), noise)


# ---------------------------------------------------------------------------------------------
# Measures.


def test_transport_cost_sums_dimensions_and_averages_pairs():
    x0 = torch.zeros(2, 2, 2)
    x1 = torch.stack([torch.ones(2, 2), 2 * torch.ones(2, 2)])
    assert flow.transport_cost(x0, x1) == pytest.approx((4 * 1 + 4 * 4) / 2)


def test_straightness_is_zero_for_lines_and_exact_for_a_parabola():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    line = torch.stack([t, 3 * t], -1)[:, None]  # (steps + 1, B = 1, 2)
    assert flow.straightness(line) == pytest.approx(0, abs=1e-20)
    parabola = torch.stack([t, t**2], -1)[:, None]
    # Step velocities are (1, (2k + 1) / N), chord (1, 1): mean of ((2k + 1 - N) / N)^2 = (1 - 1/N^2) / 3.
    assert flow.straightness(parabola) == pytest.approx((1 - 1 / 100**2) / 3, rel=1e-9)


def test_straightness_of_euler_paths_uses_the_evaluated_velocities():
    velocity = lambda x, t: torch.stack([torch.ones_like(t), 2 * t], -1)  # v - chord = (0, 2t - 1)
    solution = flow.solve(velocity, torch.zeros(5, 2, dtype=torch.float64), 1000, "euler", trajectory=True)
    assert flow.straightness(solution.trajectory) == pytest.approx(1 / 3, rel=1e-2)


# ---------------------------------------------------------------------------------------------
# Training utilities.


def test_update_ema_is_the_closed_form_blend():
    model, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.clone() for p in ema.parameters()]
    flow.update_ema(ema, model, decay=0.9)
    for old, new, target in zip(before, ema.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * target)


def test_out_folder_problem_names_a_file_or_an_unwritable_parent(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert flow.out_folder_problem(str(tmp_path / "new" / "run")) is None  # made later, in a writable folder
    assert flow.out_folder_problem(str(file)) == f"{file} is an existing file, not a folder"
    assert flow.out_folder_problem(str(file / "run")) == f"{file} is not a writable folder"


def test_save_atomic_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    flow.save_atomic({"step": 3}, path)
    assert torch.load(path)["step"] == 3 and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def flip_bytes(path, tensor):
    """Invert the bytes of `tensor` where the file stores them, as a failing disk could."""
    data = bytearray(path.read_bytes())
    start = data.find(tensor.numpy().tobytes())
    assert start > 0
    data[start:start + tensor.numel() * tensor.element_size()] = bytes(
        255 - b for b in data[start:start + tensor.numel() * tensor.element_size()])
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_refused_naming_the_file(tmp_path):
    weights = {"weight": torch.linspace(-1, 1, 1024), "bias": torch.ones(3)}
    state = {"step": 5, "model": weights, "args": {"lr": 1e-3, "betas": (0.9, 0.99)}}
    flow.save_atomic(state, tmp_path / "a.pt")
    loaded = flow.load_checkpoint(tmp_path / "a.pt")
    assert "checksum" not in loaded and loaded["args"]["betas"] == (0.9, 0.99)
    assert torch.load(tmp_path / "a.pt", weights_only=True)["checksum"] == flow.checksum(loaded)
    flip_bytes(tmp_path / "a.pt", weights["weight"][100:900])  # finite values: only the checksum sees it
    assert torch.isfinite(torch.load(tmp_path / "a.pt", weights_only=True)["model"]["weight"]).all()
    with pytest.raises(SystemExit, match=r"^error: .*a.pt is corrupted \(its contents do not match their "
                                         r"checksum\): refused$"):
        flow.load_checkpoint(tmp_path / "a.pt")
    flow.save_atomic({**torch.load(tmp_path / "a.pt", weights_only=True), "step": 6}, tmp_path / "b.pt")
    assert flow.load_checkpoint(tmp_path / "b.pt")["step"] == 6  # a re-saved checkpoint gets a new checksum
    torch.save({"step": 5}, tmp_path / "old.pt")  # written before checkpoints had a checksum
    assert flow.load_checkpoint(tmp_path / "old.pt") == {"step": 5}


def test_checksum_sees_every_leaf_and_not_the_key_order():
    state = {"b": [torch.zeros(2), {"x": 1.5}], "a": ("text", None, torch.ones(1, dtype=torch.bfloat16))}
    reference = flow.checksum(state)
    assert flow.checksum(dict(reversed(state.items()))) == reference
    for changed in ({**state, "a": ("text", None, torch.zeros(1, dtype=torch.bfloat16))},  # bytes
                    {**state, "b": [torch.zeros(2), {"x": 1.25}]},  # plain data
                    {**state, "b": [torch.zeros(1, 2), {"x": 1.5}]},  # shape
                    {**state, "b": [torch.zeros(2, dtype=torch.float64), {"x": 1.5}]}):  # dtype
        assert flow.checksum(changed) != reference


def test_resume_falls_back_to_the_newest_valid_checkpoint(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for step in (2, 4, 6):
        state = {"step": step, "weight": torch.full((256,), float(step))}
        flow.save_atomic(state, folder / f"step_{step:07d}.pt")
    flip_bytes(folder / "step_0000006.pt", torch.full((256,), 6.0))
    (folder / "step_0000004.pt").write_bytes((folder / "step_0000004.pt").read_bytes()[:300])  # cut short
    path, checkpoint = flow.latest_valid_checkpoint(str(folder))
    assert path.endswith("step_0000002.pt") and checkpoint["step"] == 2
    note = capsys.readouterr().out.strip()
    assert "\n" not in note and note.startswith(f"note: {folder}/step_0000006.pt is corrupted")
    assert "step_0000004.pt cannot be read" in note and note.endswith(f"previous valid checkpoint {path}")
    (folder / "step_0000002.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: --resume: no valid checkpoint in .*checkpoints \(.*6.pt "
                                         r"is corrupted.*; .*2.pt cannot be read as a checkpoint \(\w+\)\)$"):
        flow.latest_valid_checkpoint(str(folder))


def test_remove_partial_saves_deletes_only_temporary_files(tmp_path):
    (tmp_path / "step_0000002.pt").write_bytes(b"kept")
    (tmp_path / "step_0000004.pt.123.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "args.json.9.tmp").write_text("{")
    flow.remove_partial_saves(str(tmp_path), str(tmp_path / "absent"))
    assert os.listdir(tmp_path) == ["step_0000002.pt"]


@pytest.mark.parametrize("target", ["save_atomic", "atomic_file", "write_errors"])
def test_a_failed_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, target):
    path = tmp_path / "step_0000004.pt"
    flow.save_atomic({"step": 2}, path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as error:
        if target == "save_atomic":
            flow.save_atomic({"step": 4}, path)
        elif target == "atomic_file":
            with flow.atomic_file(path) as file:
                file.write(b"half")
                disk_full()
        else:
            with flow.write_errors(path):
                disk_full()
    assert str(error.value) == f"error: cannot write {path}: No space left on device"
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]
    beneath_a_file = tmp_path / "step_0000004.pt" / "parent" / "args.json"
    with pytest.raises(SystemExit, match=r"^error: cannot write .*parent/args.json: Not a directory$"), \
            flow.atomic_file(beneath_a_file, "w") as file:
        file.write("{}")


def test_draw_examples_is_a_function_of_seed_step_and_index():
    noise, t, u = flow.draw_examples(3, 7, 6, (2, 2), uniforms=2)
    assert noise.shape == (6, 2, 2) and t.shape == (6,) and u.shape == (6, 2)
    torch.manual_seed(123)  # the global generator plays no part
    again = flow.draw_examples(3, 7, 4, (2, 2), uniforms=2)
    for whole, part in zip((noise, t, u), again):
        assert torch.equal(whole[:4], part)  # an example's draws do not depend on the batch size
    other_step, other_seed = flow.draw_examples(3, 8, 6, (2, 2))[0], flow.draw_examples(4, 7, 6, (2, 2))[0]
    assert not torch.equal(other_step, noise) and not torch.equal(other_seed, noise)
    assert not torch.equal(noise[0], noise[1]) and (0 < t).all() and (t < 1).all()
    big, logit_t, _ = flow.draw_examples(0, 0, 4000, (1,), "logit-normal")
    assert abs(big.mean()) < 0.06 and abs(big.std() - 1) < 0.05
    assert abs(torch.logit(logit_t).std() - 1) < 0.05  # t = sigmoid(N(0, 1))


class RunsCode:
    """A pickle that runs code when loaded, as a downloaded checkpoint could."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # loading it would create the marker file


def test_a_checkpoint_that_needs_pickled_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"kind": "class", "payload": RunsCode(str(marker))}, tmp_path / "downloaded.pt")
    with pytest.raises(SystemExit, match="needs pickled Python objects to load, which could run code"):
        flow.load_checkpoint(tmp_path / "downloaded.pt")
    assert not marker.exists()


def test_require_names_the_missing_package():
    with pytest.raises(SystemExit, match="pip install no-such-package"):
        flow.require("no_such_module_xyz", "no-such-package")


def test_refuse_overwrite_stops_only_for_checkpoints_without_resume(tmp_path):
    flow.refuse_overwrite(tmp_path, [None, None], resume=False)  # a fresh --out
    flow.refuse_overwrite(tmp_path, ["step_0000002.pt"], resume=True)
    with pytest.raises(SystemExit, match="already holds checkpoints: add --resume"):
        flow.refuse_overwrite(tmp_path, [None, "step_0000002.pt"], resume=False)
    with pytest.raises(SystemExit, match="holds no checkpoint to continue"):
        flow.refuse_overwrite(tmp_path, [None, None], resume=True)


def test_load_checkpoint_round_trips_and_names_bad_files(tmp_path):
    state = {"parts": [{"weight": torch.randn(3), "name": "x", "shape": (1, 2)}], "step": 7}
    flow.save_atomic(state, tmp_path / "good.pt")
    loaded = flow.load_checkpoint(tmp_path / "good.pt")  # tensors and plain data, nested
    assert loaded["step"] == 7 and torch.equal(loaded["parts"][0]["weight"], state["parts"][0]["weight"])
    assert loaded["parts"][0]["shape"] == (1, 2) and loaded["parts"][0]["name"] == "x"
    with pytest.raises(SystemExit, match="no checkpoint at .*missing.pt"):
        flow.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match=r"^error: .*bad.pt cannot be read as a checkpoint \(\w+\)$"):
        flow.load_checkpoint(tmp_path / "bad.pt")


def test_resolve_checkpoint_takes_a_file_or_a_run_folders_latest_step(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoints/step_.*pt in"):
        flow.resolve_checkpoint(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    for step in (9, 10, 200):  # zero-padded, so the name order is the step order
        flow.save_atomic({"step": step}, tmp_path / "checkpoints" / f"step_{step:07d}.pt")
    latest = flow.resolve_checkpoint(str(tmp_path))
    assert latest.endswith("step_0000200.pt") and flow.load_checkpoint(str(tmp_path))["step"] == 200
    assert flow.resolve_checkpoint(latest) == latest
    assert flow.latest_checkpoint(str(tmp_path / "mapper")) is None
    with pytest.raises(SystemExit, match="no checkpoint at .*gone.pt: the file does not exist"):
        flow.resolve_checkpoint(str(tmp_path / "gone.pt"))


def test_warmup_lr_is_linear_then_constant():
    assert [flow.warmup_lr(1.0, step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert flow.warmup_lr(1e-3, 0, 0) == 1e-3  # no warm-up


def test_trim_log_keeps_only_the_selected_records(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + "\n")
    flow.trim_log(path, lambda record: record["step"] <= 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    flow.trim_log(tmp_path / "absent.jsonl", lambda record: True)  # no log yet: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def test_trim_log_keeps_records_up_to_the_step_and_drops_a_partial_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')  # disk full mid-line
    flow.trim_log(log, lambda record: record["step"] <= 3)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    flow.trim_log(log, lambda record: record["step"] <= 0)  # a fresh run starts an empty log
    assert log.read_text() == ""


def test_a_checkpoint_with_nan_weights_is_refused_naming_the_tensor(tmp_path):
    weights = {"layer.weight": torch.ones(3), "layer.bias": torch.tensor([0.0, float("nan")])}
    flow.save_atomic({"step": 1, "ema": weights, "rng": [{"torch": torch.zeros(4, dtype=torch.uint8)}]},
                     tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match=r"holds NaN or inf values in checkpoint\['ema'\]\['layer.bias'\]"):
        flow.load_checkpoint(tmp_path / "nan.pt")
    weights["layer.bias"] = torch.zeros(2)
    flow.save_atomic({"step": 1, "ema": weights}, tmp_path / "finite.pt")
    assert flow.load_checkpoint(tmp_path / "finite.pt")["step"] == 1
