import pytest
import torch
import torch.nn.functional as F

from pce_timm.layers.embed import PatchEmbedSPP, cell_mean
from pce_timm.layers.kernels_cpu import overlap_add
from pce_timm.layers.patches import (
    coord_channels,
    grid_size,
    halo,
    patch_positions,
    patchify,
    pixel_patch_index,
    unpatchify,
    window_index,
)


@pytest.mark.parametrize('cell', [(2, 2), (7, 7), (1, 3), (4, 1)])
def test_cell_mean_equals_avg_pool(cell):
    torch.manual_seed(0)
    x = torch.randn(2, 3, cell[0] * 3, cell[1] * 2, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(cell_mean(x, cell), F.avg_pool2d(x, cell))
    with torch.no_grad():
        torch.testing.assert_close(cell_mean(x, cell), F.avg_pool2d(x, cell))
    torch.autograd.gradcheck(lambda t: cell_mean(t, cell), (x,))


@pytest.mark.parametrize('hw,patch', [((16, 16), (8, 8)), ((20, 18), (8, 8)), ((7, 9), (4, 2)), ((5, 5), (8, 8))])
def test_patchify_round_trip(hw, patch):
    x = torch.randn(2, 3, *hw)
    patches = patchify(x, patch)
    gh, gw = grid_size(*hw, patch)
    assert patches.shape == (2, gh * gw, 3, *patch)
    assert torch.equal(unpatchify(patches, *hw), x)


def test_patchify_order_is_row_major():
    x = torch.arange(16.).view(1, 1, 4, 4)
    patches = patchify(x, (2, 2))
    assert patches[0, 1, 0].tolist() == [[2., 3.], [6., 7.]]  # second patch = top row, second column
    assert patches[0, 2, 0].tolist() == [[8., 9.], [12., 13.]]


def test_coord_channels_values():
    coords = coord_channels((2, 3), (2, 2), torch.device('cpu'))
    assert coords.shape == (4, 4, 6)
    assert coords.min() >= -1 and coords.max() <= 1
    # pixel x inside its patch repeats every patch; patch x is constant inside a patch
    assert coords[0, 0].tolist() == [-0.5, 0.5] * 3
    assert coords[2, 0].tolist() == pytest.approx([-2 / 3] * 2 + [0.0] * 2 + [2 / 3] * 2)
    assert coords[3, :, 0].tolist() == [-0.5, -0.5, 0.5, 0.5]
    positions = patch_positions((2, 3), torch.device('cpu'))
    assert positions[1].tolist() == pytest.approx([0.0, -0.5])


@pytest.mark.parametrize('kernel_size,stride', [(3, 1), (3, 2), (1, 1), (5, 1), (1, 2)])
def test_window_index_reproduces_same_padded_conv(kernel_size, stride):
    h, w, patch = 11, 13, (4, 4)
    x = torch.randn(1, 2, h, w)
    weight = torch.randn(3, 2, kernel_size, kernel_size)
    ref = torch.nn.functional.conv2d(x, weight, stride=stride, padding=kernel_size // 2)
    index = window_index(h, w, patch, kernel_size, stride, torch.device('cpu'))  # [n, wh, ww]
    rows = torch.cat([x[0].flatten(1), torch.zeros(2, 1)], dim=1)  # zero column for outside pixels
    windows = rows[:, index].permute(1, 0, 2, 3)  # [n, c, wh, ww]
    out = torch.nn.functional.conv2d(windows, weight, stride=stride)  # [n, o, ph, pw]
    out = out.unsqueeze(0)
    assert halo(kernel_size, stride)[0] == kernel_size // 2
    assert torch.allclose(unpatchify(out, ref.shape[2], ref.shape[3]), ref, atol=1e-5)


def test_pixel_patch_index():
    patch_id, offset = pixel_patch_index(3, 5, (2, 2), torch.device('cpu'))
    assert patch_id.tolist() == [[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]
    assert offset[1].tolist() == [2, 3, 2, 3, 2]


@pytest.mark.parametrize('grid,window,stride', [
    ((3, 4), (6, 6), (4, 4)),  # 3x3 conv halo around 4 px patches
    ((2, 3), (5, 9), (4, 8)),  # stride-2 halo, non-square
    ((2, 2), (8, 8), (2, 2)),  # windows over 3 tiles wide (7x7 kernel, 2 px patches)
    ((3, 2), (4, 4), (4, 4)),  # no overlap
])
def test_overlap_add_equals_fold(grid, window, stride):
    torch.manual_seed(0)
    (gh, gw), (wh, ww), (sh, sw) = grid, window, stride
    tiles = torch.randn(2, gh, gw, wh, ww, 3)
    out = overlap_add(tiles, stride)
    rh, rw = -(-wh // sh), -(-ww // sw)
    assert out.shape == (2, (gh + rh - 1) * sh, (gw + rw - 1) * sw, 3)
    cols = tiles.permute(0, 5, 3, 4, 1, 2).reshape(2, 3 * wh * ww, gh * gw)
    folded = F.fold(cols, ((gh - 1) * sh + wh, (gw - 1) * sw + ww), (wh, ww), stride=stride)
    expected = torch.zeros(2, 3, out.shape[1], out.shape[2])
    expected[:, :, :folded.shape[2], :folded.shape[3]] = folded
    torch.testing.assert_close(out.permute(0, 3, 1, 2), expected)


@pytest.mark.parametrize('hw,patch', [((16, 16), (8, 8)), ((13, 10), (4, 4)), ((14, 14), (7, 7)), ((9, 12), (6, 3))])
def test_patch_embedding_matches_its_definition(hw, patch):
    """1x1 conv on [C + 4]-channel patches (features + coordinates), then pyramid pooling 1, 2, 4 per patch.

    Patches of 8 and 4 px take the pool-first path; 7, 6 and 3 px ones do not divide into 4x4 cells.
    """
    torch.manual_seed(0)
    embed = PatchEmbedSPP(5, embed_chs=3)
    x = torch.randn(2, 5, *hw)
    grid = grid_size(*hw, patch)
    padded = torch.nn.functional.pad(x, (0, grid[1] * patch[1] - hw[1], 0, grid[0] * patch[0] - hw[0]))
    with_coords = torch.cat([padded, coord_channels(grid, patch, x.device).expand(2, -1, -1, -1)], dim=1)
    patches = patchify(with_coords, patch).flatten(0, 1)  # [b * n, c + 4, ph, pw]
    projected = embed.proj(patches)
    expected = torch.cat([F.adaptive_avg_pool2d(projected, level).flatten(1) for level in (1, 2, 4)], dim=1)
    torch.testing.assert_close(embed(x, patch), expected.view(2, grid[0] * grid[1], 3 * 21), atol=1e-5, rtol=1e-5)
