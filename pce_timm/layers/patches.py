"""Patch geometry: the patch grid, halo windows for the expert kernel, and coordinate channels.

Everything here is a pure function of static sizes (Python ints), so the index tensors it builds are the
same on every call with the same shapes and never depend on tensor values.

Shape legend: b batch, c channels, h/w height/width of the map, ph/pw patch size, gh/gw patch grid,
n = gh * gw patches, wh/ww halo window size, ho/wo output map, oph/opw output patch size.
"""
from typing import List, NamedTuple, Tuple

import torch
import torch.nn.functional as F


def grid_size(height: int, width: int, patch_size: Tuple[int, int]) -> Tuple[int, int]:
    """Number of patch rows and columns covering an ``height x width`` map (the last ones may be padded)."""
    return (height + patch_size[0] - 1) // patch_size[0], (width + patch_size[1] - 1) // patch_size[1]


def grid_patch_size(height: int, width: int, patch_grid: Tuple[int, int], stride: int = 1) -> Tuple[int, int]:
    """The patch size (h, w) that cuts a ``height x width`` map into a ``patch_grid`` of patches, or as close as
    whole patches allow.

    Sized on the output map of a stride-``stride`` conv (``ceil(size / stride)`` pixels a side): each output patch
    is ``ceil(out / grid)`` pixels, and the patch on the input map ``stride`` times that, so the grid never
    exceeds ``patch_grid`` (nor the output map: a map smaller than the grid gets 1-pixel output patches) and a
    patch is a multiple of ``stride``. A map of 7 output pixels and a grid of 2 gives 4-pixel patches (the
    last one padded); 14 and 2 gives 7.
    """
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1
    return (-(-out_h // patch_grid[0]) * stride, -(-out_w // patch_grid[1]) * stride)


class PatchGeometry(NamedTuple):
    """The static sizes of one PCE layer on one input size, all Python ints (see :func:`patch_geometry`).

    The input map ``height x width`` is cut into a ``grid_h x grid_w`` grid of ``patch_h x patch_w`` patches;
    a ``kernel_size`` conv with stride ``stride`` and same padding maps it to ``out_h x out_w``, where each
    patch becomes an ``out_patch_h x out_patch_w`` output patch and reads a halo window of ``window_h x
    window_w`` input pixels (``halo_before`` above/left of the patch, ``halo_after`` below/right).
    """
    height: int
    width: int
    patch_h: int
    patch_w: int
    kernel_size: int
    stride: int
    halo_before: int
    halo_after: int
    grid_h: int
    grid_w: int
    out_h: int
    out_w: int
    out_patch_h: int
    out_patch_w: int
    window_h: int
    window_w: int


def patch_geometry(
        height: int, width: int, patch_size: Tuple[int, int], kernel_size: int, stride: int) -> PatchGeometry:
    """The :class:`PatchGeometry` of a ``kernel_size``/``stride`` PCE layer with ``patch_size`` on a map."""
    ph, pw = patch_size
    gh, gw = grid_size(height, width, patch_size)
    before, after = halo(kernel_size, stride)
    return PatchGeometry(
        height, width, ph, pw, kernel_size, stride, before, after, gh, gw,
        (height - 1) // stride + 1, (width - 1) // stride + 1,  # same padding: ceil(size / stride)
        ph // stride, pw // stride, ph + before + after, pw + before + after)


def pad_to_grid(x: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad the bottom/right edge of ``x`` [..., h, w] to whole patches; ``x`` itself when it fits."""
    h, w = x.shape[-2], x.shape[-1]
    gh, gw = grid_size(h, w, patch_size)
    if gh * patch_size[0] == h and gw * patch_size[1] == w:
        return x  # F.pad would copy even with nothing to pad
    return F.pad(x, (0, gw * patch_size[1] - w, 0, gh * patch_size[0] - h))


def patchify(x: torch.Tensor, patch_size: Tuple[int, int]) -> torch.Tensor:
    """Cut ``x`` [b, c, h, w] into patches [b, n, c, ph, pw], zero-padding the bottom/right edge."""
    b, c, h, w = x.shape
    gh, gw = grid_size(h, w, patch_size)
    ph, pw = patch_size
    x = pad_to_grid(x, patch_size)
    x = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c, ph, pw)


def unpatchify(patches: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: patches [b, n, c, ph, pw] -> map [b, c, height, width] (padding cropped)."""
    b, n, c, ph, pw = patches.shape
    gh, gw = grid_size(height, width, (ph, pw))
    if gh * gw != n:
        raise ValueError(f'patches: {n} patches do not tile a {height}x{width} map with patch size {(ph, pw)}')
    x = patches.reshape(b, gh, gw, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, gh * ph, gw * pw)
    return x[:, :, :height, :width]


def centered_coords(size: int, device: torch.device) -> torch.Tensor:
    """Coordinates of ``size`` cell centres spread over [-1, 1] (a single cell sits at 0)."""
    return (torch.arange(size, device=device, dtype=torch.float32) * 2 + 1) / size - 1


def patch_positions(grid: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """(x, y) of each patch centre in the image, in [-1, 1], row-major: [n, 2]."""
    ys = centered_coords(grid[0], device)
    xs = centered_coords(grid[1], device)
    return torch.stack([xs.repeat(grid[0]), ys.repeat_interleave(grid[1])], dim=1)


def coord_channels(grid: Tuple[int, int], patch_size: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """The 4 CoordConv channels over the padded map [4, gh * ph, gw * pw].

    Channels: pixel x and y inside its patch, then the patch's x and y in the image, each in [-1, 1].
    """
    (gh, gw), (ph, pw) = grid, patch_size
    px = centered_coords(pw, device).repeat(gw).view(1, -1).expand(gh * ph, gw * pw)
    py = centered_coords(ph, device).repeat(gh).view(-1, 1).expand(gh * ph, gw * pw)
    gx = centered_coords(gw, device).repeat_interleave(pw).view(1, -1).expand(gh * ph, gw * pw)
    gy = centered_coords(gh, device).repeat_interleave(ph).view(-1, 1).expand(gh * ph, gw * pw)
    return torch.stack([px, py, gx, gy], dim=0)


def halo(kernel_size: int, stride: int) -> Tuple[int, int]:
    """Extra input pixels (before, after) a patch needs so a ``kernel_size`` conv with padding k//2 fills it."""
    before = kernel_size // 2
    return before, kernel_size - stride - before


def window_index(
        height: int,
        width: int,
        patch_size: Tuple[int, int],
        kernel_size: int,
        stride: int,
        device: torch.device,
) -> torch.Tensor:
    """Flat pixel index of every halo-window pixel of every patch: [n, wh, ww], ``height * width`` = outside.

    Window ``i`` covers the input pixels that output patch ``i`` of a stride-``stride`` conv reads, so a
    conv with padding 0 over the window reproduces the same-padded conv over the whole map. Pixels outside
    the map point at ``height * width``, which callers map to a zero row.
    """
    (ph, pw), (gh, gw) = patch_size, grid_size(height, width, patch_size)
    before, after = halo(kernel_size, stride)
    wh, ww = ph + before + after, pw + before + after
    rows = torch.arange(gh, device=device).view(gh, 1) * ph - before + torch.arange(wh, device=device).view(1, wh)
    cols = torch.arange(gw, device=device).view(gw, 1) * pw - before + torch.arange(ww, device=device).view(1, ww)
    rows = rows.view(gh, 1, wh, 1)
    cols = cols.view(1, gw, 1, ww)
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    index = torch.where(inside, rows * width + cols, torch.full_like(rows * cols, height * width))
    return index.reshape(gh * gw, wh, ww)


def pixel_patch_index(
        height: int,
        width: int,
        patch_size: Tuple[int, int],
        device: torch.device,
) -> List[torch.Tensor]:
    """For every pixel of a ``height x width`` map: its patch id and its flat offset inside the patch.

    Returns ``[patch_id, offset]``, each [height, width]; used to scatter per-patch results back to pixels.
    """
    _, gw = grid_size(height, width, patch_size)
    ph, pw = patch_size
    ys = torch.arange(height, device=device).view(-1, 1)
    xs = torch.arange(width, device=device).view(1, -1)
    patch_id = (ys // ph) * gw + xs // pw
    offset = (ys % ph) * pw + xs % pw
    return [patch_id, offset]
