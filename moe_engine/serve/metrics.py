"""``/metrics``: the server's figures in Prometheus text format, read from the batcher's counters
(written by the engine thread) and the engine's stats snapshot at scrape time.

Names (all prefixed ``moe_serve_``): ``http_requests_total{path,status}``, ``requests_finished_total
{reason}``, ``queue_depth`` (waiting for a sequence slot), ``running_sequences``, ``prompt_tokens_total``,
``output_tokens_total``, ``output_tokens_per_second`` (last 10 s), ``decode_steps_total{policy}``,
``step_sequences_total{policy}`` and ``step_distinct_experts_total{policy}`` (per-policy figures: their
ratios are sequences per step and predicted distinct experts per step), ``prefill_forwards_total``,
``forward_seconds_total``, and from the engine ``expert_hit_rate``, ``expert_hits_total``,
``expert_late_hits_total``, ``expert_misses_total``, ``expert_bytes_moved_total``, ``stall_seconds_total``.

Example::

    text, content_type = render(service)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class _Collector:
    def __init__(self, service) -> None:
        self.service = service

    def collect(self):
        s = self.service
        m = s.batcher.metrics
        policy = s.batcher.config.policy
        http = CounterMetricFamily("moe_serve_http_requests", "HTTP requests answered", labels=["path", "status"])
        for (path, status), n in sorted(s.http_requests.items()):
            http.add_metric([path, str(status)], n)
        yield http
        fin = CounterMetricFamily("moe_serve_requests_finished", "generation requests ended, by reason", labels=["reason"])
        for reason, n in sorted(m.requests_finished.items()):
            fin.add_metric([reason], n)
        yield fin
        yield GaugeMetricFamily("moe_serve_queue_depth", "requests waiting for a sequence slot", value=m.waiting)
        yield GaugeMetricFamily("moe_serve_running_sequences", "sequences prefilling or decoding", value=m.running)
        yield CounterMetricFamily("moe_serve_prompt_tokens", "prompt tokens admitted", value=m.prompt_tokens)
        yield CounterMetricFamily("moe_serve_output_tokens", "tokens generated", value=m.output_tokens)
        yield GaugeMetricFamily("moe_serve_output_tokens_per_second", "tokens generated per second, last 10 s",
                                value=m.tokens_per_second())  # fmt: skip
        for name, doc, value in (
            ("decode_steps", "decode forwards", m.decode_steps),
            ("step_sequences", "sequences decoded, summed over steps", m.step_seqs_total),
            ("step_distinct_experts", "predicted distinct experts per step, summed over steps",
             m.step_distinct_experts_total),
        ):  # fmt: skip
            fam = CounterMetricFamily(f"moe_serve_{name}", doc, labels=["policy"])
            fam.add_metric([policy], value)
            yield fam
        yield CounterMetricFamily("moe_serve_prefill_forwards", "prefill forwards", value=m.prefill_forwards)
        yield CounterMetricFamily("moe_serve_forward_seconds", "seconds in model forwards", value=m.forward_seconds)
        acc = m.hits + m.late_hits + m.misses
        yield GaugeMetricFamily("moe_serve_expert_hit_rate", "ready hits / expert accesses since start",
                                value=m.hits / acc if acc else 0.0)  # fmt: skip
        yield CounterMetricFamily("moe_serve_expert_hits", "experts ready when their layer ran", value=m.hits)
        yield CounterMetricFamily("moe_serve_expert_late_hits", "experts still loading when needed", value=m.late_hits)
        yield CounterMetricFamily("moe_serve_expert_misses", "experts loaded on demand", value=m.misses)
        yield CounterMetricFamily("moe_serve_expert_bytes_moved", "expert bytes copied into the fast tier",
                                  value=m.bytes_moved)  # fmt: skip
        yield CounterMetricFamily("moe_serve_stall_seconds", "seconds compute waited for expert copies",
                                  value=m.stall_seconds)  # fmt: skip


def render(service) -> tuple[str, str]:
    """The Prometheus exposition text of ``service`` and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(service))
    return generate_latest(registry).decode(), CONTENT_TYPE_LATEST
