"""VidCom² (Liu et al., EMNLP 2025): a token budget per frame from the frame's uniqueness, then per frame the tokens
most distinct from both the video and the frame.

1. Frame compression adjustment. With every token unit-normalised, the video centre g is the mean token of the
   video and the frame centre g_t the mean token of frame t. A frame's uniqueness is u_t = -mean_n cos(x_tn, g).
   Its budget grows with sigma_t = softmax(u / temperature): r_t = r * (1 + sigma_t - mean(sigma)).
2. Adaptive token compression. Frame t keeps its r_t-share of tokens with the lowest cos(x, g) + cos(x, g_t): the
   tokens least like the video as a whole and least like the rest of their frame.

The per-frame budgets are apportioned so that they sum to the request's budget exactly (see README).
"""

from __future__ import annotations

import torch

from dycoke.budget import apportion
from dycoke.merging import Placed, bottom_indices


def centre_similarities(frame_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos(x_tn, video centre) and cos(x_tn, frame centre), both [T, N], on unit-normalised tokens."""
    unit = torch.nn.functional.normalize(frame_tokens.float(), dim=-1)
    video_centre = unit.mean(dim=(0, 1))
    frame_centre = unit.mean(dim=1, keepdim=True)
    cosine = torch.nn.functional.cosine_similarity
    return cosine(unit, video_centre[None, None], dim=-1), cosine(unit, frame_centre, dim=-1)


def frame_weights(to_video: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 + sigma_t - mean(sigma) [T], sigma = softmax(uniqueness / temperature): each frame's budget share."""
    uniqueness = -to_video.mean(dim=1)
    sigma = torch.softmax(uniqueness / temperature, dim=0)
    return 1 + sigma - sigma.mean()


def frame_budgets(to_video: torch.Tensor, kept: int, temperature: float) -> list[int]:
    num_frames, tokens_per_frame = to_video.shape
    weights = frame_weights(to_video, temperature).tolist()
    return apportion(kept, weights, [tokens_per_frame] * num_frames)


def vidcom2_compress(frame_tokens: torch.Tensor, kept: int, temperature: float) -> Placed:
    num_frames, tokens_per_frame, _ = frame_tokens.shape
    if kept == num_frames * tokens_per_frame:
        return Placed.everything(frame_tokens)
    to_video, to_frame = centre_similarities(frame_tokens)
    budgets = frame_budgets(to_video, kept, temperature)
    positions = torch.cat([
        bottom_indices(to_video[t] + to_frame[t], budgets[t]) + t * tokens_per_frame for t in range(num_frames)
    ])
    return Placed(frame_tokens.reshape(-1, frame_tokens.shape[-1])[positions], positions)
