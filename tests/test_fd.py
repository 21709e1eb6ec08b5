import numpy as np
import pytest
import scipy.linalg
import torch

from sana_sprint.evaluation import fd as FD


def random_spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d)) * scale
    return a @ a.T + 0.1 * np.eye(d)


def scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


@pytest.mark.parametrize("d", [1, 3, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_matches_scipy_closed_form(d, seed):
    rng = np.random.default_rng(seed)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d, 0.5)
    assert FD.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)


def test_frechet_distance_diagonal_analytic():
    # commuting (diagonal) covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
    assert FD.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_identical_sets_give_zero():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    mu, s = FD.feature_stats(f)
    assert abs(FD.frechet_distance(mu, s, mu, s)) < 1e-9


def test_feature_stats_are_unbiased():
    f = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, s = FD.feature_stats(f)
    assert np.allclose(mu, [2.0, 4.0])
    assert np.allclose(s, np.cov(f.T, ddof=1))


def test_sampled_gaussians_approach_closed_form():
    rng = np.random.default_rng(0)
    d = 4
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    s1, s2 = random_spd(rng, d, 0.5), random_spd(rng, d, 0.3)
    x = rng.multivariate_normal(mu1, s1, size=40000)
    y = rng.multivariate_normal(mu2, s2, size=40000)
    got = FD.frechet_distance(*FD.feature_stats(x), *FD.feature_stats(y))
    assert got == pytest.approx(scipy_fd(mu1, s1, mu2, s2), rel=0.05)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return FD.ShapesFeatureNet(width=16, feature_dim=32).eval()


def test_feature_module_shapes_and_input_conventions(net):
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (5, 3, 64, 64), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        a = net(u8)
        b = net(u8.float() / 255)  # torchmetrics normalize=True convention
        c = net(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))  # resized to 64
    assert a.shape == (5, 32) and c.shape == (2, 32) and net.num_features == 32
    assert torch.allclose(a, b, atol=1e-5)


def test_to_uint8_nchw_accepts_all_formats():
    rng = np.random.default_rng(0)
    hwc = rng.integers(0, 256, size=(3, 8, 8, 3), dtype=np.uint8)
    ref = torch.from_numpy(hwc).permute(0, 3, 1, 2)
    assert torch.equal(FD.to_uint8_nchw(hwc), ref)
    assert torch.equal(FD.to_uint8_nchw(list(hwc)), ref)
    assert torch.equal(FD.to_uint8_nchw(ref), ref)
    unit = ref.float() / 127.5 - 1.0  # project convention [-1, 1]
    assert torch.equal(FD.to_uint8_nchw(unit), ref)
    with pytest.raises(ValueError):
        FD.to_uint8_nchw(hwc.astype(np.float32))


def test_fd_shapes_agrees_with_torchmetrics(net):
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (64, 3, 64, 64), generator=g, dtype=torch.uint8)
    b = (a.float() * 0.7 + 20).to(torch.uint8)
    metric = FrechetInceptionDistance(feature=net)
    metric.update(a, real=True)
    metric.update(b, real=False)
    ours = FD.fd_shapes(a, b, net)
    assert ours > 1e-3
    assert ours == pytest.approx(metric.compute().item(), rel=1e-4)
    assert abs(FD.fd_shapes(a, a, net)) < 1e-6


def test_save_load_roundtrip(net, tmp_path):
    FD.save_feature_net(net, tmp_path)
    loaded = FD.load_feature_net(tmp_path)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        # fp16 storage: features agree to fp16 weight precision
        assert torch.allclose(loaded(x), net(x), atol=2e-2, rtol=2e-2)
    assert (tmp_path / "model.safetensors").stat().st_size < 2_000_000


def test_reference_stats_cache(net, tmp_path):
    mu, s = FD.reference_stats(n=8, seed=3, size=32, net=net, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    mu2, s2 = FD.reference_stats(n=8, seed=3, size=32, net=net, cache_dir=tmp_path)
    assert np.array_equal(mu, mu2) and np.array_equal(s, s2)
    direct = FD.feature_stats(FD.extract_features(FD.world_images(8, 3, 32), net))
    assert np.allclose(direct[0], mu) and np.allclose(direct[1], s)
