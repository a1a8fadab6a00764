import pytest
import torch

from engine.models.vq import AtrousBlock, VectorQuantizer


def _initialised_vq(num_codes: int = 16, dim: int = 8, seed: int = 0) -> VectorQuantizer:
    torch.manual_seed(seed)
    vq = VectorQuantizer(num_codes=num_codes, dim=dim, beta=0.25)
    vq.initialized.fill_(True)  # keep the N(0, 1) codebook: no data init
    return vq


def test_picks_the_true_nearest_entry():
    vq = _initialised_vq().eval()
    z = torch.randn(3, 8, 5, 7)
    quantized, indices, _ = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 8).double()
    brute = torch.stack([((vq.codebook.double() - v) ** 2).sum(1).argmin() for v in flat])
    assert torch.equal(indices.flatten(), brute)
    assert indices.shape == (3, 5, 7)
    codes = vq.codebook[brute].detach().float()
    assert torch.allclose(quantized.permute(0, 2, 3, 1).reshape(-1, 8), codes, atol=1e-6)


def test_gradient_passes_straight_through():
    vq = _initialised_vq()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    quantized, _, _ = vq(z)
    weights = torch.randn_like(quantized)
    (gz,) = torch.autograd.grad((quantized * weights).sum(), z)
    assert torch.allclose(gz, weights)  # d quantized / d z = identity


def test_loss_is_codebook_plus_beta_commitment():
    vq = _initialised_vq()
    z = torch.randn(2, 8, 4, 4, requires_grad=True)
    quantized, _, loss = vq(z)
    squared = ((quantized.detach() - z.detach()) ** 2).mean()
    assert loss.item() == pytest.approx((1 + 0.25) * squared.item(), rel=1e-5)
    # The codebook term reaches the entries, the commitment term reaches z.
    g_code, g_z = torch.autograd.grad(loss, [vq.codebook, z])
    assert g_code.abs().sum() > 0 and g_z.abs().sum() > 0


def test_codebook_moves_towards_the_data():
    vq = _initialised_vq(num_codes=4, dim=8)
    centre = torch.full((8,), 3.0)
    data = centre[None, :, None, None] + 0.1 * torch.randn(4, 8, 4, 4)
    optimiser = torch.optim.SGD(vq.parameters(), lr=0.5)

    def nearest_distance() -> float:
        return (vq.codebook - centre).norm(dim=1).min().item()

    before = nearest_distance()
    for _ in range(20):
        _, _, loss = vq(data)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert nearest_distance() < 0.25 * before


def test_first_training_batch_initialises_the_codebook_from_data():
    torch.manual_seed(0)
    vq = VectorQuantizer(num_codes=16, dim=4).train()
    z = 10.0 + torch.randn(1, 4, 2, 2)  # fewer vectors (4) than entries: drawn with replacement
    vq(z)
    assert bool(vq.initialized)
    data = z.permute(0, 2, 3, 1).reshape(-1, 4)
    distances = torch.cdist(vq.codebook.detach(), data).min(dim=1).values
    assert distances.max() < 0.1
    frozen = vq.codebook.detach().clone()
    vq(z + 5.0)  # later batches do not re-initialise
    assert torch.equal(vq.codebook.detach(), frozen)


def test_eval_mode_never_initialises():
    vq = VectorQuantizer(num_codes=4, dim=4).eval()
    before = vq.codebook.detach().clone()
    vq(torch.randn(1, 4, 3, 3) + 100.0)
    assert not bool(vq.initialized)
    assert torch.equal(vq.codebook.detach(), before)


@pytest.mark.parametrize(
    "kwargs", [{"num_codes": 0, "dim": 4}, {"num_codes": 4, "dim": 0}, {"beta": -0.1}]
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        VectorQuantizer(**kwargs)


def test_wrong_feature_shape_is_rejected():
    vq = _initialised_vq(dim=8)
    with pytest.raises(ValueError, match="expected"):
        vq(torch.randn(1, 7, 2, 2))
    with pytest.raises(ValueError, match="expected"):
        vq(torch.randn(7, 8))


def test_atrous_block_keeps_the_grid_and_sets_the_width():
    block = AtrousBlock(in_channels=12, out_channels=6, dilations=(1, 2, 4))
    out = block(torch.randn(2, 12, 5, 9))
    assert out.shape == (2, 6, 5, 9)
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())


@pytest.mark.parametrize("dilations", [(), (0, 2)])
def test_atrous_block_rejects_bad_dilations(dilations):
    with pytest.raises(ValueError, match="dilations"):
        AtrousBlock(4, 4, dilations)


def test_init_from_data_puts_one_entry_on_each_cluster():
    centres = torch.randn(16, 8) * 10
    vectors = centres.repeat_interleave(50, 0) + 0.01 * torch.randn(800, 8)
    vq = VectorQuantizer(num_codes=16, dim=8)
    vq.init_from_data(vectors, seed=3)
    assert bool(vq.initialized)
    nearest = torch.cdist(centres, vq.codebook.detach()).min(1).values
    assert nearest.max() < 0.1  # every cluster got its own entry
    again = VectorQuantizer(num_codes=16, dim=8)
    again.init_from_data(vectors, seed=3)
    assert torch.equal(again.codebook, vq.codebook)  # seeded
    with pytest.raises(RuntimeError, match="non-finite"):
        vq.init_from_data(torch.full((32, 8), float("nan")))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        vq.init_from_data(torch.randn(32, 4))


def test_restart_moves_only_unused_entries_onto_recent_vectors():
    vq = _initialised_vq(num_codes=4, dim=2)
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [50.0, 50.0], [-50.0, 50.0]]))
    assert vq.restart_dead() == 0  # nothing seen yet: nothing to move onto
    vq.train()
    z = torch.tensor([[0.1, 0.0], [0.9, 1.1], [0.0, 0.2], [1.0, 0.8]])[:, :, None, None]
    vq(z.permute(1, 0, 2, 3).reshape(1, 2, 4, 1))
    before = vq.codebook.detach().clone()
    assert vq.restart_dead() == 2
    moved = vq.codebook.detach()
    assert torch.equal(moved[:2], before[:2])  # used entries stay
    recent = z[:, :, 0, 0]
    for row in moved[2:]:
        assert (recent - row).abs().sum(1).min() == 0  # dead ones now sit on recent vectors
    assert vq.usage.sum() == 0  # counts start again


def test_usage_is_counted_in_training_only():
    vq = _initialised_vq().eval()
    vq(torch.randn(1, 8, 3, 3))
    assert vq.usage.sum() == 0
    vq.train()(torch.randn(1, 8, 3, 3))
    assert vq.usage.sum() == 9
    assert "usage" not in vq.state_dict()  # per-epoch training state, not saved
