"""DyCokeCache with layers on different devices (the several-GPU case, here `cpu` and `meta`), and precision:
TTM's similarities in the model's dtype when it is wider than float32."""

from __future__ import annotations

import torch

from dycoke.pruning import DyCokeCache
from dycoke.ttm import temporal_keep_mask

HEADS, DIM, PROMPT = 2, 4, 7  # one kv head; 2 text tokens, 4 visual tokens, 1 text token
DEVICES = ["cpu", "cpu", "cpu", "meta"]  # layer 1 scores (L = 2); pruned layers 2 on cpu, 3 on meta


def test_pruned_layers_keep_their_storage_on_their_own_device():
    generator = torch.Generator().manual_seed(0)
    rows = lambda length: torch.randn(1, 1, length, DIM, generator=generator)  # noqa: E731
    cache = DyCokeCache(visual_start=2, frame_of_visual=torch.tensor([0, 0, 1, 1]), num_frames=2, prune_layer=2,
                        prune_ratio=0.5, reselect_threshold=0.9)
    cache.num_layers = len(DEVICES)
    prefill = [(rows(PROMPT), rows(PROMPT)) for _ in DEVICES]
    for layer, device in enumerate(DEVICES):
        cache.update(prefill[layer][0].to(device), prefill[layer][1].to(device), layer)

    step = [(rows(1), rows(1)) for _ in DEVICES]
    cache.update(*step[0], 0)
    scoring_keys, _ = cache.update(*step[1], 1)
    query = torch.randn(1, HEADS, 1, DIM, generator=generator)
    cache.attend(1, query, scoring_keys, None, DIM**-0.5)
    # By hand: both query heads share the one kv head; softmax over the 8 keys, mean over heads, visual span 2..5.
    logits = query[0, :, 0] @ scoring_keys[0, 0].T * DIM**-0.5
    visual = logits.softmax(dim=-1).mean(dim=0)[2:6]
    selected = sorted(visual.argsort(descending=True)[:2].tolist())
    assert cache.selected.tolist() == selected

    kept = [0, 1, *(2 + index for index in selected), 6]
    for layer in (2, 3):
        keys, values = cache.update(step[layer][0].to(DEVICES[layer]), step[layer][1].to(DEVICES[layer]), layer)
        assert keys.device.type == values.device.type == DEVICES[layer]
        assert keys.shape == (1, 1, len(kept) + 1, DIM)
        assert cache.compact[layer - 2].device.type == DEVICES[layer]
    assert cache.layers[3].keys.device.type == "meta"
    keys, values = cache.update(rows(1), rows(1), 2)  # the next step on the cpu layer: kept rows, then both steps
    torch.testing.assert_close(keys[:, :, :len(kept)], prefill[2][0][:, :, kept], rtol=0, atol=0)
    torch.testing.assert_close(values[:, :, len(kept)], step[2][1][:, :, 0], rtol=0, atol=0)


def test_ttm_breaks_float64_ties_as_the_exact_rule_does():
    # Frame 1 against frame 0 at two positions: cosines 1 - 5.0e-9 and 1 - 6.05e-9, equal in float32. Keeping one
    # token (K = 0.5), the exact rule keeps position 1, the less similar; float32 would tie and keep position 0.
    anchor = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    changed = torch.tensor([[1.0, 1.0e-4], [1.0, 1.1e-4]], dtype=torch.float64)
    mask = temporal_keep_mask(torch.stack([anchor, changed]), merge_ratio=0.5, window=2)
    assert mask.tolist() == [[True, True], [False, True]]
