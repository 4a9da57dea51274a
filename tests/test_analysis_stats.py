"""Routing statistics and routes: known answers on hand-made routings."""
import json
import math

import pytest
import torch

from pce_timm.analysis.routes import (
    cluster_images_by_route,
    cluster_purity,
    clustering_scores,
    finest_grid,
    grid_index_map,
    route_counts,
    route_features,
    routes_from_layers,
)
from pce_timm.analysis.stats import (
    RoutingAccumulator,
    dead_experts,
    imbalance,
    layer_summary,
    mean_router_entropy,
    order_by_probability,
    usage_by_class,
    usage_by_position,
    usage_counts,
    usage_entropy,
)


def _top1(experts) -> torch.Tensor:
    """Hand-made top-1 choices [b, n] -> expert_indices [b, n, 1]."""
    return torch.as_tensor(experts).long().unsqueeze(-1)


def _random_routing(b: int, n: int, e: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    probs = (3 * torch.randn(b, n, e, generator=gen)).softmax(-1)
    return probs, probs.topk(k, dim=-1).indices


def test_uniform_usage_is_balanced():
    counts = usage_counts(_top1([[0, 1, 2, 3], [3, 2, 1, 0]]), num_experts=4)
    assert counts.tolist() == [2, 2, 2, 2]
    assert usage_entropy(counts) == pytest.approx(1.0)
    assert imbalance(counts) == 1.0
    assert dead_experts(counts) == []


def test_collapsed_usage():
    counts = usage_counts(_top1([[1, 1, 1], [1, 1, 1]]), num_experts=4)
    assert counts.tolist() == [0, 6, 0, 0]
    assert usage_entropy(counts) == pytest.approx(0.0)
    assert imbalance(counts) == float('inf')
    assert dead_experts(counts) == [0, 2, 3]


def test_single_expert_and_thresholds():
    assert usage_entropy(torch.tensor([7])) == 1.0
    assert mean_router_entropy(torch.ones(2, 3, 1), normalize=True) == 0.0
    assert dead_experts(torch.tensor([50, 45, 5, 0]), threshold=0.05) == [2, 3]
    assert imbalance(torch.tensor([4, 2, 1])) == 4.0
    with pytest.raises(ValueError, match='counts'):
        usage_entropy(torch.zeros(3))
    with pytest.raises(ValueError, match='threshold'):
        dead_experts(torch.tensor([1, 2]), threshold=2.0)


def test_router_entropy_known_answers_and_its_logits_form():
    from pce_timm.layers.routing_stats import normalize_entropy, router_entropy, router_entropy_from_logits

    uniform, certain = torch.full((2, 3, 4), 0.25), torch.eye(4)[[0, 2, 1]].expand(2, 3, 4)
    assert torch.allclose(router_entropy(uniform), torch.full((2, 3), math.log(4)))
    assert torch.equal(router_entropy(certain), torch.zeros(2, 3))
    assert normalize_entropy(math.log(4), 4) == pytest.approx(1.0) and normalize_entropy(0.3, 1) == 0.0
    logits = 4 * torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(router_entropy_from_logits(logits), router_entropy(logits.softmax(-1)), atol=1e-5)
    probs = logits.softmax(-1)
    assert mean_router_entropy(probs) == pytest.approx(float(router_entropy(probs.double()).mean()), rel=1e-12)


def test_layer_top1_soft_from_logits_sparse_from_first_choice():
    from pce_timm.layers.routing_stats import layer_top1

    logits = torch.tensor([[[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]]])  # [1, 2, 3]
    in_index_order = torch.tensor([[[0, 1, 2], [0, 1, 2]]])  # soft routing may list every expert by index
    assert layer_top1(logits, in_index_order, soft=True).tolist() == [[1, 0]]
    chosen = torch.tensor([[[2, 0], [1, 2]]])  # sparse: most probable first, whatever the logits say
    assert layer_top1(logits, chosen, soft=False).tolist() == [[2, 1]]


def test_one_semantics_for_unused_experts_inf_in_memory_null_in_json():
    from pce_timm.layers.routing_stats import json_number
    from pce_timm.train.metrics import routing_summary, summarize_usage

    counts = torch.tensor([6, 0, 3, 3])
    assert imbalance(counts) == float('inf') and json_number(imbalance(counts)) is None
    assert json_number(2.0) == 2.0
    record = summarize_usage(counts, mean_entropy=0.25)  # the results.json record of a layer
    assert record['imbalance'] is None and record['dead_experts'] == dead_experts(counts) == [1]
    assert record['usage_entropy'] == round(usage_entropy(counts), 6)
    assert record['usage_share'] == [0.5, 0.0, 0.25, 0.25] and record['usage_counts'] == [6, 0, 3, 3]
    balanced = summarize_usage(torch.tensor([4, 2, 2, 4]), mean_entropy=0.25)
    assert balanced['imbalance'] == imbalance(torch.tensor([4, 2, 2, 4])) == 2.0
    assert routing_summary({'a': record, 'b': balanced})['max_imbalance'] is None
    assert routing_summary({'b': balanced})['max_imbalance'] == 2.0


def test_usage_counts_all_choices():
    expert_indices = torch.tensor([[[0, 1], [2, 1]]])
    assert usage_counts(expert_indices, 3).tolist() == [1, 0, 1]
    assert usage_counts(expert_indices, 3, all_choices=True).tolist() == [1, 2, 1]
    with pytest.raises(ValueError, match='expert_indices'):
        usage_counts(expert_indices, 2)
    with pytest.raises(ValueError, match='num_experts'):
        usage_counts(expert_indices, 0)


def test_router_entropy_known_answers():
    uniform = torch.full((2, 5, 4), 0.25)
    assert mean_router_entropy(uniform) == pytest.approx(math.log(4))
    assert mean_router_entropy(uniform, normalize=True) == pytest.approx(1.0)
    one_hot = torch.nn.functional.one_hot(torch.tensor([[0, 3, 2]]), 4).float()
    assert mean_router_entropy(one_hot) == 0.0


def test_usage_by_position_hand_made_grid():
    # 2x2 grid, 4 images: the top-left patch always picks expert 0, the others split.
    experts = [[0, 1, 2, 2], [0, 1, 2, 0], [0, 2, 2, 1], [0, 1, 2, 1]]
    usage = usage_by_position(_top1(experts), grid_size=(2, 2), num_experts=3)
    assert usage.shape == (3, 2, 2)
    assert torch.allclose(usage[0], torch.tensor([[1.0, 0.0], [0.0, 0.25]]))
    assert torch.allclose(usage[1], torch.tensor([[0.0, 0.75], [0.0, 0.5]]))
    assert torch.allclose(usage[2], torch.tensor([[0.0, 0.25], [1.0, 0.25]]))
    assert torch.allclose(usage.sum(0), torch.ones(2, 2))
    with pytest.raises(ValueError, match='grid_size'):
        usage_by_position(_top1(experts), grid_size=(3, 2), num_experts=3)


def test_usage_by_class_hand_made():
    experts = [[0, 0], [0, 1], [2, 2]]
    usage = usage_by_class(_top1(experts), torch.tensor([0, 0, 2]), num_experts=3, num_classes=3)
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert torch.allclose(usage, expected)
    with pytest.raises(ValueError, match='labels'):
        usage_by_class(_top1(experts), torch.tensor([0, 5, 1]), num_experts=3, num_classes=3)


def test_soft_routing_in_index_order_is_reordered():
    probs, _ = _random_routing(3, 4, 4, 4, seed=1)
    index_order = torch.arange(4).expand(3, 4, 4)  # soft routing listed by expert id, not by probability
    by_prob = order_by_probability(probs, index_order)
    assert torch.equal(by_prob[..., 0], probs.argmax(-1))
    assert torch.equal(order_by_probability(probs, by_prob), by_prob)
    assert layer_summary(probs, index_order) == layer_summary(probs, by_prob)


def test_layer_summary_is_json_ready():
    probs, indices = _random_routing(4, 6, 3, 2, seed=2)
    summary = layer_summary(probs, indices, grid_size=(2, 3))
    json.dumps(summary)
    assert summary['usage_counts'] == usage_counts(indices, 3).tolist()
    assert sum(summary['usage_share']) == pytest.approx(1.0)
    assert sum(summary['usage_counts_all']) == 4 * 6 * 2
    assert summary['mean_router_entropy'] == pytest.approx(mean_router_entropy(probs))
    assert summary['mean_top_probability'] == pytest.approx(float(probs.max(-1).values.mean()))


def test_accumulator_matches_one_shot():
    batches = [_random_routing(b, 6, 4, 2, seed=s) for s, b in enumerate((3, 5, 2))]
    gen = torch.Generator().manual_seed(9)
    labels = [torch.randint(0, 3, (probs.shape[0],), generator=gen) for probs, _ in batches]
    acc = RoutingAccumulator(num_experts=4, grid_size=(2, 3), num_classes=3)
    for (probs, indices), batch_labels in zip(batches, labels, strict=True):
        acc.update(probs, indices, batch_labels)
    probs = torch.cat([p for p, _ in batches])
    indices = torch.cat([i for _, i in batches])
    all_labels = torch.cat(labels)
    expected = layer_summary(probs, indices, grid_size=(2, 3))
    got = acc.summary()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    assert torch.allclose(acc.position_usage(), usage_by_position(indices, (2, 3), 4))
    assert torch.allclose(acc.class_usage(), usage_by_class(indices, all_labels, 4, 3))


def test_accumulator_rejects_mismatches():
    acc = RoutingAccumulator(num_experts=4, grid_size=(2, 3))
    with pytest.raises(RuntimeError, match='no images'):
        acc.summary()
    probs, indices = _random_routing(2, 5, 4, 1, seed=0)
    with pytest.raises(ValueError, match='router_probs'):
        acc.update(probs, indices)
    probs, indices = _random_routing(2, 6, 4, 1, seed=0)
    with pytest.raises(ValueError, match='labels'):
        acc.update(probs, indices, torch.zeros(2))


def test_grid_index_map_nearest_position():
    upsampled = [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert grid_index_map((2, 2), (4, 4)).view(4, 4).tolist() == upsampled
    assert grid_index_map((4, 4), (2, 2)).tolist() == [5, 7, 13, 15]  # centre ties go down-right
    assert torch.equal(grid_index_map((3, 5), (3, 5)), torch.arange(15))
    assert grid_index_map((1, 1), (2, 3)).tolist() == [0] * 6
    assert finest_grid([(2, 2), (4, 4), (8, 2)]) == (4, 4)


def test_routes_across_grids():
    fine = {'expert_indices': _top1([[0, 1, 2, 3]]), 'grid_size': (2, 2)}
    coarse = {'expert_indices': _top1([[5]]), 'grid_size': (1, 1)}
    routes = routes_from_layers({'a': fine, 'b': coarse})
    assert routes.tolist() == [[[0, 5], [1, 5], [2, 5], [3, 5]]]
    assert routes_from_layers([coarse, fine]).tolist() == [[[5, 0], [5, 1], [5, 2], [5, 3]]]


def test_route_counts_known_frequencies():
    routes = torch.tensor([[[0, 1], [0, 1], [2, 2], [0, 1]], [[2, 2], [1, 0], [0, 1], [0, 1]]])
    counts = route_counts(routes, top_n=2)
    assert counts == [{'route': [0, 1], 'count': 5, 'share': 5 / 8}, {'route': [2, 2], 'count': 2, 'share': 2 / 8}]
    assert sum(r['count'] for r in route_counts(routes, top_n=None)) == 8


def test_route_features():
    routes = torch.tensor([[[0, 1], [1, 1]]])  # 1 image, 2 positions, 2 layers
    assert route_features(routes, 2).tolist() == [[1, 0, 0, 1, 0, 1, 0, 1]]
    assert route_features(routes, 2, kind='histogram').tolist() == [[0.5, 0.5, 0.0, 1.0]]
    with pytest.raises(ValueError, match='kind'):
        route_features(routes, 2, kind='tfidf')


def test_cluster_purity_known_case():
    clusters = [0, 0, 0, 0, 1, 1, 1, 1]
    labels = [0, 0, 0, 1, 1, 1, 1, 0]
    assert cluster_purity(clusters, labels) == 0.75
    assert cluster_purity(torch.tensor(labels), torch.tensor(labels)) == 1.0
    scores = clustering_scores(clusters, clusters)
    assert scores['nmi'] == pytest.approx(1.0) and scores['adjusted_rand'] == pytest.approx(1.0)


@pytest.mark.parametrize('method', ['kmeans', 'agglomerative'])
def test_clustering_recovers_route_groups(method):
    # two groups of images: group 0 routes everything through expert 0, group 1 through expert 2
    routes = torch.cat([torch.zeros(5, 4, 2), torch.full((5, 4, 2), 2.0)]).long()
    routes[0, 0, 0] = 1  # a little noise
    labels = [0] * 5 + [1] * 5
    cluster_ids = cluster_images_by_route(route_features(routes, 3), num_clusters=2, method=method, seed=0)
    assert cluster_purity(cluster_ids, labels) == 1.0
    with pytest.raises(ValueError, match='method'):
        cluster_images_by_route(route_features(routes, 3), 2, method='dbscan')
