"""A measured level: the rule for when it has measured enough, its interval for a percentile, and its row."""

import random

from engine.stats import SLO
from serve.levels import min_requests, percentile_ci


def test_a_level_needs_enough_requests_for_its_percentile():
    assert min_requests(SLO(percentile=99)) == 100
    assert min_requests(SLO(percentile=99.9)) == 1000
    assert min_requests(SLO(percentile=90)) == 20 and min_requests(None) == 20


def test_the_percentile_interval_covers_the_true_value_and_says_when_it_cannot():
    rng = random.Random(0)
    covered = 0
    for _ in range(200):
        lo, hi = percentile_ci([rng.random() for _ in range(400)], 90)
        covered += lo <= 0.9 <= hi
    assert 180 <= covered <= 200  # a 95% interval: about 190 of 200
    values = [rng.random() for _ in range(100)]
    assert percentile_ci(values, 99) is None  # the upper rank is past the largest of 100: no bound
    lo, hi = percentile_ci(values, 50)
    assert lo < sorted(values)[50] < hi
