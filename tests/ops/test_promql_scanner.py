from .promql import metric_names, substitute_grafana_variables


def test_metric_names_skips_functions_labels_and_keywords():
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{code=~"X|Y", le!="1"}[5m])))'
        " / on (job) group_left sum without (instance) (b_total offset 5m) > bool 0.5"
        ' and up{job="x"} == 0 or rec:rule:rate5m * 1e3'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "up", "rec:rule:rate5m"}


def test_grafana_variables_are_substituted():
    expr = 'rate(x_total{job=~"$job"}[$__rate_interval])'
    assert substitute_grafana_variables(expr) == 'rate(x_total{job=~".*"}[5m])'
