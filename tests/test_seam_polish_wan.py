"""The exact toy instrument under flow matching (Wan's layout and UniPC scheduler): the same loop behaviour as on
CogVideoX — plain sampling jumps at the wrap, the latent shift closes it but leaves the last step's cut inside, and
seam polish removes that, in full and window mode. Means of seeds 0-2 at 50 steps; the cycle is Wan's trained 21."""

from __future__ import annotations

import math

import pytest

from instrument import LENGTH_SCALE, seed_means
from loopui.engine.polish import polish_cost
from tiny_wan import build_tiny_wan

SEEDS = (0, 1, 2)
SMOOTH = 1.05


@pytest.fixture(scope="module")
def wan_bench():
    return seed_means(build_tiny_wan(), 21, SEEDS)


def test_flow_matching_plain_sampling_jumps_at_the_wrap(wan_bench):
    seam, interior, calls, _ = wan_bench(21, "off", 0)
    expected = 1 / math.sqrt(1 - math.exp(-1 / (2 * LENGTH_SCALE**2)))  # independent ends vs a step: 4.3
    assert abs(seam - expected) < 0.35
    assert interior < 1.05 and calls == 50


def test_flow_matching_loop_closes_the_wrap_and_leaves_the_last_cut(wan_bench):
    seam, interior, _, worst = wan_bench(21, "off")
    assert seam < SMOOTH and interior > 1.08  # 1.11 here (flow shift 3 spends fewer steps near the end)
    # The final step (49) saw the cycle rotated by 49 * 10 mod 21 = 7: its clip began at latent 7.
    assert worst == [(6, 7)] * len(SEEDS)


def test_flow_matching_polish_is_as_clean_as_on_cogvideox(wan_bench):
    seam, interior, calls, _ = wan_bench(21, "fast")
    plain_interior = wan_bench(21, "off", 0)[1]
    assert seam < SMOOTH and interior < SMOOTH and interior < plain_interior + 0.02
    assert calls / 50 == pytest.approx(polish_cost("fast", 50))


def test_flow_matching_polish_in_window_mode(wan_bench):
    plain_interior = wan_bench(42, "off", 0)[1]
    assert plain_interior > 1.3  # windows without shift leave their edges in place
    seam, interior, _, _ = wan_bench(42, "fast")
    loop_interior = wan_bench(42, "off")[1]
    assert loop_interior > 1.03 and interior < loop_interior - 0.02
    assert seam < SMOOTH and interior < SMOOTH
