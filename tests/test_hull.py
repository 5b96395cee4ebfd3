"""R2: the kernelized convex hull, on a point cloud whose hull vertices are known."""
import pytest
import torch

import kcm_core
from kcm_core.arch import ffn_blocks
from kcm_core.hull import HullConfig, kernel_hull
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


@pytest.mark.parametrize("stop_rule", ["absolute", "signed"])
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
    ({"max_iter": 2.5}, "max_iter"),
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
