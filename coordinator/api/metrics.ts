// Prometheus metrics of the coordinator.
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from 'prom-client';

export interface MetricSources {
  nodesOnline: () => number;
  nodesTotal: () => number;
  streams: () => number;
  unsentBytes: () => { full: number; deltas: number };
  versionDrift: () => number;
  apiKeyExpiries: () => Promise<{ id: string; expiresAt: number }[]>;
}

export class Metrics {
  readonly registry = new Registry();
  readonly registrations: Counter<'result'>;
  readonly rejectedRegistrations: Counter<'reason'>;
  readonly deltaLatency: Histogram;
  readonly refusedCalls: Counter<'method' | 'reason'>;
  readonly authFailures: Counter<'api'>;
  readonly authThrottled: Counter<'api'>;
  readonly relayPackets: Counter<'result'>;
  readonly relayBytes: Counter;

  constructor(src: MetricSources) {
    const registers = [this.registry];
    // prom-client's own names start with process_ or nodejs_ already.
    collectDefaultMetrics({ register: this.registry, prefix: 'meshgate_' });
    new Gauge({
      name: 'meshgate_nodes_online',
      help: 'Nodes with an open control stream',
      registers,
      collect() {
        this.set(src.nodesOnline());
      },
    });
    new Gauge({
      name: 'meshgate_nodes',
      help: 'Registered nodes',
      registers,
      collect() {
        this.set(src.nodesTotal());
      },
    });
    new Gauge({
      name: 'meshgate_streams',
      help: 'Open control streams',
      registers,
      collect() {
        this.set(src.streams());
      },
    });
    new Gauge({
      name: 'meshgate_stream_unsent_bytes',
      help: 'Bytes handed to the control streams that their connections have not taken yet, by kind (full netmaps, deltas)',
      labelNames: ['kind'],
      registers,
      collect() {
        const unsent = src.unsentBytes();
        this.set({ kind: 'full' }, unsent.full);
        this.set({ kind: 'delta' }, unsent.deltas);
      },
    });
    new Gauge({
      name: 'meshgate_version_drift_nodes',
      help: 'Nodes whose agent version differs from the desired one',
      registers,
      collect() {
        this.set(src.versionDrift());
      },
    });
    new Gauge({
      name: 'meshgate_api_key_expiry_seconds',
      help: 'Seconds until each active API key expires',
      labelNames: ['id'],
      registers,
      async collect() {
        this.reset();
        const now = Date.now();
        for (const k of await src.apiKeyExpiries())
          this.set({ id: k.id }, Math.round((k.expiresAt - now) / 1000));
      },
    });
    this.registrations = new Counter({
      name: 'meshgate_registrations_total',
      help: 'Registration attempts by result',
      labelNames: ['result'],
      registers,
    });
    this.rejectedRegistrations = new Counter({
      name: 'meshgate_registrations_rejected_total',
      help: 'Refused registrations by reason',
      labelNames: ['reason'],
      registers,
    });
    this.refusedCalls = new Counter({
      name: 'meshgate_refused_calls_total',
      help: 'Agent calls refused by method and reason',
      labelNames: ['method', 'reason'],
      registers,
    });
    this.authFailures = new Counter({
      name: 'meshgate_auth_failures_total',
      help: 'Failed authentications (API key or call signature) by API',
      labelNames: ['api'],
      registers,
    });
    this.authThrottled = new Counter({
      name: 'meshgate_auth_throttled_total',
      help: 'Calls refused unchecked because their address failed to authenticate too often, by API',
      labelNames: ['api'],
      registers,
    });
    this.relayPackets = new Counter({
      name: 'meshgate_relay_packets_total',
      help: 'Datagrams offered to the relay, by what happened to them',
      labelNames: ['result'],
      registers,
    });
    this.relayBytes = new Counter({
      name: 'meshgate_relay_bytes_total',
      help: 'Bytes forwarded by the relay',
      registers,
    });
    this.deltaLatency = new Histogram({
      name: 'meshgate_delta_latency_seconds',
      help: 'Time from a state change to its delta being written to the streams',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers,
    });
  }
}
