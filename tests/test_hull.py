"""R2: the kernelized convex hull, on a point cloud whose hull vertices are known."""
import pytest
import torch

import kcm_core
from kcm_core.arch import ffn_blocks
from kcm_core.hull import HullConfig, hull_memory_bytes, kernel_hull, spearman, top_overlap
from kcm_core.kernel import gaussian_kernel, kernel_row_sums, median_distance
from kcm_core.scores import r2

CORNER_IDX = [10, 11, 22, 23]


def square_cloud() -> torch.Tensor:
    """30 random points in [-2, 2]^2 and the 4 corners of [-4, 4]^2 at rows 10, 11, 22, 23."""
    gen = torch.Generator().manual_seed(0)
    inner = torch.rand(30, 2, generator=gen, dtype=torch.float64) * 4 - 2
    corners = torch.tensor([[4.0, 4.0], [-4.0, 4.0], [-4.0, -4.0], [4.0, -4.0]], dtype=torch.float64)
    return torch.cat([inner[:10], corners[:2], inner[10:20], corners[2:], inner[20:]])


def top4(scores: torch.Tensor) -> list[int]:
    return sorted(torch.topk(scores, 4).indices.tolist())


@pytest.mark.parametrize("stop_rule", ["absolute", "signed", "spearman", "topk", "closed_form"])
@pytest.mark.parametrize("sigma_mode,sigma", [("fixed", 1.0), ("fixed", 2.0), ("median", 1.0),
                                              ("median", 0.5)])
def test_square_corners_get_the_top_four_scores(sigma_mode, sigma, stop_rule):
    fit = kernel_hull(square_cloud(), HullConfig(sigma=sigma, sigma_mode=sigma_mode,
                                                 stop_rule=stop_rule))
    assert fit.converged
    assert top4(fit.scores) == CORNER_IDX
    assert fit.scores.shape == (34,) and fit.scores.dtype == torch.float32
    assert bool((fit.scores > 0).all())
    if sigma_mode == "fixed":
        assert fit.sigma == sigma
    else:
        assert fit.sigma != sigma        # scaled by the median pairwise distance (> 1 here)


def test_r2_scores_function_on_an_n_by_d_tensor():
    scores = kcm_core.r2_scores(square_cloud(), sigma=1.0, alpha=0.01)
    assert scores.shape == (34,)
    assert top4(scores) == CORNER_IDX
    assert torch.equal(scores, kernel_hull(square_cloud(), HullConfig(sigma=1.0, alpha=0.01)).scores)
    fixed = kcm_core.r2_scores(square_cloud().float(), sigma=1.0, alpha=0.01, sigma_mode="fixed")
    assert top4(fixed) == CORNER_IDX
    assert not torch.allclose(fixed, scores)     # the keyword options reach the fit


def test_iteration_count_is_reported_and_signed_rule_stops_sooner():
    absolute = kernel_hull(square_cloud(), HullConfig(stop_rule="absolute"))
    signed = kernel_hull(square_cloud(), HullConfig(stop_rule="signed"))
    assert 1 <= signed.iterations < absolute.iterations <= 200
    assert absolute.converged and signed.converged
    assert 0 <= absolute.last_delta <= 0.01
    assert abs(signed.last_delta) <= 0.01


def test_max_iter_caps_the_fit_and_reports_no_convergence():
    fit = kernel_hull(square_cloud(), HullConfig(max_iter=2))
    assert fit.iterations == 2 and not fit.converged and fit.last_delta > 0.01


def test_median_sigma_makes_scores_independent_of_weight_scale():
    small, big = square_cloud(), square_cloud() * 1000
    median = HullConfig(sigma_mode="median")
    assert torch.allclose(kernel_hull(small, median).scores, kernel_hull(big, median).scores,
                          atol=1e-5)
    fixed = HullConfig(sigma_mode="fixed")
    assert not torch.allclose(kernel_hull(small, fixed).scores, kernel_hull(big, fixed).scores,
                              atol=1e-3)


def test_scores_follow_the_points_when_they_are_permuted():
    points = square_cloud()
    perm = torch.randperm(34, generator=torch.Generator().manual_seed(3))
    base = kernel_hull(points).scores
    assert torch.allclose(kernel_hull(points[perm]).scores, base[perm], atol=1e-6)


def test_r2_per_layer_uses_the_rows_of_the_down_projection(tiny_model):
    for family in ("bert", "gpt2"):
        model = tiny_model(family)
        scores, fits = r2(model)
        assert [s.shape[0] for s in scores] == [37, 37]
        for block, s, fit in zip(ffn_blocks(model), scores, fits):
            rows = block.down.weight.detach()
            rows = rows if family == "gpt2" else rows.t()       # GPT-2 Conv1D is already (N, d)
            assert torch.equal(s, kernel_hull(rows).scores)
            assert fit.iterations >= 1


@pytest.mark.parametrize("kwargs,word", [
    ({"sigma": 0.0}, "sigma"), ({"sigma": -1.0}, "sigma"), ({"sigma": float("nan")}, "sigma"),
    ({"sigma_mode": "mean"}, "sigma_mode"), ({"alpha": 0.0}, "alpha"), ({"alpha": -0.1}, "alpha"),
    ({"stop_rule": "relative"}, "stop_rule"), ({"max_iter": 0}, "max_iter"),
    ({"max_iter": 2.5}, "max_iter"), ({"rank_tol": -0.1}, "rank_tol"), ({"rank_tol": 1.0}, "rank_tol"),
    ({"top_share": 0.0}, "top_share"), ({"top_share": 1.5}, "top_share"),
])
def test_hull_config_validation_names_the_bad_value(kwargs, word):
    with pytest.raises(ValueError) as err:
        HullConfig(**kwargs)
    message = str(err.value)
    assert word in message and repr(next(iter(kwargs.values())))[:3] in message


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_points_raise(bad):
    points = square_cloud()
    points[5, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        kernel_hull(points)


def test_points_must_be_two_dimensional_and_empty_is_fine():
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        kernel_hull(torch.ones(3, 2, 2))
    fit = kernel_hull(torch.zeros(0, 4))
    assert fit.scores.shape == (0,) and fit.iterations == 0


# --------------------------------------------------------------------------- scaling options

def cloud(n: int, d: int, seed: int) -> torch.Tensor:
    """Anisotropic Gaussian points: some directions spread more, so the ranking is not flat."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.2, 2.0, d,
                                                                                   dtype=torch.float64)


def dense_reference(points: torch.Tensor, sigma: float, iterations: int) -> torch.Tensor:
    """The textbook update on whole matrices, in float64: C <- C * sqrt(K / (K @ C))."""
    kernel = torch.exp(-torch.cdist(points, points).pow(2) / (2 * sigma * sigma))
    n = points.shape[0]
    coef = torch.full((n, n), 1.0 / n, dtype=torch.float64)
    for _ in range(iterations):
        coef = coef * torch.sqrt(kernel / (kernel @ coef))
    return torch.diagonal(coef)


def test_closed_form_equals_one_step_of_the_iteration():
    for points in (square_cloud(), cloud(200, 12, seed=1)):
        one_step = kernel_hull(points, HullConfig(max_iter=1))
        closed = kernel_hull(points, HullConfig(stop_rule="closed_form"))
        assert closed.iterations == 1 and closed.converged and closed.sigma == one_step.sigma
        assert torch.allclose(closed.scores, one_step.scores, rtol=1e-5, atol=0)
        n = points.shape[0]
        kernel = torch.exp(-torch.cdist(points, points).pow(2) / (2 * closed.sigma ** 2))
        expected = 1.0 / torch.sqrt(n * kernel.sum(1))          # C_ii = 1 / sqrt(N rowsum_i(K))
        assert torch.allclose(closed.scores.double(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("block", [1, 7, 64, 1024])
def test_blocked_in_place_update_matches_the_dense_update(block):
    points = cloud(97, 9, seed=2)
    fit = kernel_hull(points, HullConfig(max_iter=6, alpha=1e-9), block=block)
    assert fit.iterations == 6 and not fit.converged
    reference = dense_reference(points, fit.sigma, 6)
    assert torch.allclose(fit.scores.double(), reference, rtol=1e-4, atol=0)


def test_block_size_does_not_change_the_fit():
    points = cloud(150, 6, seed=3)
    fits = [kernel_hull(points, block=b) for b in (5, 150, 4096)]
    assert len({f.iterations for f in fits}) == 1
    for f in fits[1:]:
        assert torch.allclose(f.scores, fits[0].scores, rtol=1e-5, atol=0)


@pytest.mark.parametrize("rule,tol", [("spearman", 1e-4), ("spearman", 1e-6), ("topk", 0.0),
                                      ("topk", 0.05)])
def test_ranking_rules_stop_where_the_ranking_stops_changing(rule, tol):
    points = cloud(120, 8, seed=4)
    config = HullConfig(stop_rule=rule, rank_tol=tol, top_share=0.3)
    fit = kernel_hull(points, config)
    assert fit.converged and fit.iterations >= 2

    def diag(t: int) -> torch.Tensor:
        return kernel_hull(points, HullConfig(max_iter=t, alpha=1e-9)).scores

    def change(a: torch.Tensor, b: torch.Tensor) -> float:
        return 1 - (spearman(a, b) if rule == "spearman" else top_overlap(a, b, 0.3))

    t = fit.iterations
    assert torch.equal(fit.scores, diag(t))                  # the same iterate as the plain update
    assert change(diag(t - 1), diag(t)) <= tol
    assert fit.last_delta == pytest.approx(change(diag(t - 1), diag(t)), abs=1e-9)
    if t > 2:                                                # it did not stop one step too late
        assert change(diag(t - 2), diag(t - 1)) > tol


def test_a_tighter_rank_tolerance_never_stops_sooner():
    points = cloud(120, 8, seed=5)
    iterations = [kernel_hull(points, HullConfig(stop_rule="spearman", rank_tol=tol)).iterations
                  for tol in (1e-2, 1e-4, 1e-6, 1e-8)]
    assert iterations == sorted(iterations) and iterations[-1] > iterations[0]


def test_spearman_and_top_overlap_known_answers():
    x = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.7])
    assert spearman(x, x * 10 + 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # ranks 0 4 1 2 3 vs 0 1 2 3 4: 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 6 * 12 / 120
    assert spearman(torch.tensor([1.0, 5.0, 2.0, 3.0, 4.0]), torch.arange(5.0)) == pytest.approx(0.4)
    assert top_overlap(x, x, 0.4) == 1.0                      # top 2 of 5: items 3 and 4
    assert top_overlap(x, torch.tensor([0.9, 0.5, 0.3, 0.1, 0.7]), 0.4) == 0.5
    assert spearman(torch.ones(1), torch.ones(1)) == 1.0


def test_median_distance_matches_the_full_matrix_and_its_fixed_subsample():
    for n in (40, 1500):                                      # 1500 points: 1.1 M pairs, every 2nd
        points = cloud(n, 3, seed=6)
        d2 = torch.cdist(points, points).pow(2)
        iu = torch.triu_indices(n, n, offset=1)
        vals = d2[iu[0], iu[1]]
        if vals.numel() > 1_000_000:
            vals = vals[:: vals.numel() // 1_000_000 + 1]
        for block in (7, 1024):
            assert median_distance(points, block) == pytest.approx(float(vals.median().sqrt()),
                                                                   rel=1e-12)


def test_kernel_blocks_equal_the_whole_kernel():
    points = cloud(53, 5, seed=7)
    whole = torch.exp(-torch.cdist(points, points).pow(2) / (2 * 1.7 ** 2))
    for block in (1, 10, 53, 100):
        assert torch.allclose(gaussian_kernel(points, 1.7, block, torch.float64), whole, atol=1e-12)
        assert torch.allclose(kernel_row_sums(points, 1.7, block), whole.sum(1), atol=1e-10)


def test_memory_bound_counts_the_kernel_and_c_only_when_iterating():
    n, d = 11008, 4096
    iterating, closed = hull_memory_bytes(n, d), hull_memory_bytes(n, d, closed_form=True)
    assert iterating - closed >= 2 * 4 * n * n                 # K and C in float32
    assert closed < 8 * n * n                                  # never an N x N float64 matrix
    assert iterating < 2.0e9
    assert hull_memory_bytes(n, d, block=256) < iterating


def test_fit_runs_on_the_device_given_and_returns_cpu_scores():
    fit = kernel_hull(square_cloud(), device="cpu")
    assert fit.scores.device.type == "cpu" and fit.scores.dtype == torch.float32
    with pytest.raises(ValueError, match="block"):
        kernel_hull(square_cloud(), block=0)


def test_auto_is_the_exact_iteration_up_to_3072_neurons_and_the_closed_form_above(monkeypatch):
    from kcm_core import hull as H
    assert HullConfig().stop_rule == "auto"
    assert H.resolved_rule(HullConfig(), 3072) == "absolute"
    assert H.resolved_rule(HullConfig(), 3073) == "closed_form"
    assert H.resolved_rule(HullConfig(stop_rule="spearman"), 10_000) == "spearman"
    points = square_cloud()
    auto, exact = kernel_hull(points, HullConfig()), kernel_hull(points, HullConfig(stop_rule="absolute"))
    assert auto.stop_rule == exact.stop_rule == "absolute" and auto.iterations == exact.iterations > 1
    assert torch.equal(auto.scores, exact.scores)
    monkeypatch.setattr(H, "AUTO_EXACT_MAX_WIDTH", len(points) - 1)       # the same cloud counts as wide
    wide, closed = kernel_hull(points, HullConfig()), kernel_hull(points, HullConfig(stop_rule="closed_form"))
    assert wide.stop_rule == "closed_form" and wide.iterations == 1
    assert torch.equal(wide.scores, closed.scores)


def test_score_details_record_the_rule_each_layer_used(tiny_model):
    from kcm_core import scores as S
    from kcm_core.methods import ScoreDetails
    _, fits = S.r2(tiny_model("bert"), HullConfig())
    details = ScoreDetails.of(fits)
    assert details.r2_stop_rules == ("absolute",) * len(fits)
    assert details.to_dict()["r2_stop_rules"] == ["absolute"] * len(fits)
