"""Expert-choice dispatch: every expert convolves the top-c patches it picked in each image.

The slots are a static [b, e, c] layout (c from :func:`.routing.expert_choice_capacity`, a Python int), laid
out as the slot discipline's buffers of ``s = b * c`` slots per expert, so the :class:`~.plans.SparsePlan`,
the window gathers, the grouped expert conv and the output-row maps of :mod:`.slots` serve unchanged. Every
slot is filled; a patch picked by several experts gets their weighted sum, a patch no expert picked gets zero
(the block's residual carries it). Choices are made within each image, in training as in eval, so an image's
output never depends on its batch (up to training-mode BatchNorm statistics), and the path compiles
(fullgraph) and exports as it is.

Shape legend: b batch, c/o in/out channels, h/w input map, ho/wo output map, n patches, e experts,
cap patches per expert and image, t = b * n tokens, s = b * cap slots per expert, ph/pw output patch size,
m = b * ho * wo output pixels.
"""
from typing import Optional, Tuple

import torch

from ..experts import ConvExperts
from ..gather import gather_windows
from ..patches import patch_geometry
from .plans import remainder
from .routing import ExpertChoice
from .slots import SparsePlanned, output_rows, valid_outputs, window_pixels


def expert_choice_slots(
        patch_indices: torch.Tensor, num_patches: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slot maps of expert choice [b, e, cap] in the conventions of :mod:`.slots`, with choice = expert.

    Slot ``image * cap + r`` of expert j holds the r-th patch expert j picked in that image. Returns
    ``token_of_slot`` [s, e], ``slot_of_assignment`` [e, t] (the slot of (expert, token), ``e * s`` if the expert
    did not pick the token) and ``assignment_of_slot`` [e * s] (``expert * t + token``).
    """
    b, e, cap = patch_indices.shape
    device = patch_indices.device
    num_tokens, num_slots = b * num_patches, b * cap
    token = patch_indices + torch.arange(b, device=device).view(b, 1, 1) * num_patches  # [b, e, cap]
    slot = (torch.arange(e, device=device).view(1, e, 1) * num_slots
            + torch.arange(b, device=device).view(b, 1, 1) * cap + torch.arange(cap, device=device).view(1, 1, cap))
    assignment = (torch.arange(e, device=device).view(1, e, 1) * num_tokens + token).reshape(-1)
    slot = slot.reshape(-1)
    slot_of_assignment = torch.full((e * num_tokens,), e * num_slots, dtype=torch.long, device=device)
    slot_of_assignment = slot_of_assignment.scatter(0, assignment, slot).view(e, num_tokens)
    assignment_of_slot = torch.full((e * num_slots,), e * num_tokens, dtype=torch.long, device=device)
    assignment_of_slot = assignment_of_slot.scatter(0, slot, assignment)
    return token.permute(0, 2, 1).reshape(num_slots, e), slot_of_assignment, assignment_of_slot


class ExpertChoiceDispatch(SparsePlanned):
    """Each expert on the patches it picked per image: gather windows -> grouped conv -> weighted scatter-add.

    Its plan is the one of :class:`~.slots.SlotDispatch`.
    """

    def forward(self, x: torch.Tensor, choice: ExpertChoice, experts: ConvExperts,
                patch_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """[b, c, h, w] -> output pixel rows [b, ho, wo, o]."""
        b, e, o = x.shape[0], experts.num_experts, experts.out_chs
        patch_indices, weights = choice.patch_indices, choice.weights  # [b, e, cap]
        cap = patch_indices.shape[2]
        g = patch_geometry(x.shape[2], x.shape[3], self._patch_size(patch_size), experts.kernel_size, experts.stride)
        n = g.grid_h * g.grid_w
        num_tokens, num_slots = b * n, b * cap
        plan = self._plan(g, b, x.device)
        token_of_slot, slot_of_assignment, assignment_of_slot = expert_choice_slots(patch_indices, n)

        pixels = window_pixels(x, plan, token_of_slot, num_tokens)  # [s, wh, ww, e]
        windows = gather_windows(x, pixels, None, g)  # [s, e * c, wh, ww]; autograd's backward
        valid: Optional[torch.Tensor] = None
        if experts.training and (g.out_h % g.out_patch_h != 0 or g.out_w % g.out_patch_w != 0):
            valid = valid_outputs(plan, token_of_slot, num_tokens)  # every slot is filled: only edge padding
        y = experts.forward_windows(windows, valid)  # [s, e * o, ph, pw]

        # ``inverse`` names the (expert, output pixel) each expert-output row belongs to: expert * m + pixel
        _, inverse = output_rows(plan, g, slot_of_assignment, assignment_of_slot, num_slots)
        num_pixels = plan.pixel_token.shape[0]
        pixel = torch.where(inverse < e * num_pixels, remainder(inverse, num_pixels), num_pixels)  # m: padding, dropped
        rows = y.permute(0, 2, 3, 1).reshape(-1, o)  # [s * ph * pw * e, o]
        slot_weight = weights.permute(0, 2, 1).reshape(num_slots, 1, e).to(y.dtype)  # [s, 1, e]
        patch_area = g.out_patch_h * g.out_patch_w
        row_weight = slot_weight.expand(num_slots, patch_area, e).reshape(-1, 1)
        if torch.jit.is_tracing():  # the TorchScript ONNX exporter makes index_add a scatter keeping one duplicate
            out = rows.new_zeros(num_pixels + 1, o).scatter_add(0, pixel.view(-1, 1).expand(-1, o), rows * row_weight)
        else:
            out = rows.new_zeros(num_pixels + 1, o).index_add(0, pixel, rows * row_weight)
        return out[:num_pixels].view(b, g.out_h, g.out_w, o)
