// A dedicated PostgreSQL connection that LISTENs on one channel and comes
// back after it breaks. Each (re)connection is reported, so that whoever
// listens can read what was committed while nobody was listening.
import pg from 'pg';

export interface ListenerEvents {
  notified(payload: string): void;
  /** After LISTEN took effect on a new connection; notifications before it were missed. */
  connected(): void;
  failed(err: Error): void;
}

const RETRY_MIN_MS = 100;
const RETRY_MAX_MS = 5_000;

export class PgListener {
  private client: pg.Client | null = null;
  private closed = false;
  private retryMs = RETRY_MIN_MS;
  private timer: NodeJS.Timeout | null = null;

  constructor(
    private readonly url: string,
    private readonly channel: string,
    private readonly on: ListenerEvents,
  ) {}

  start(): void {
    void this.connect();
  }

  private async connect(): Promise<void> {
    if (this.closed) return;
    const client = new pg.Client({ connectionString: this.url, keepAlive: true });
    this.client = client;
    let broken = false;
    const retry = (err: Error) => {
      if (broken) return;
      broken = true;
      client.removeAllListeners('notification');
      void client.end().catch(() => {});
      if (this.closed) return;
      this.on.failed(err);
      this.timer = setTimeout(() => void this.connect(), this.retryMs);
      this.timer.unref();
      this.retryMs = Math.min(RETRY_MAX_MS, this.retryMs * 2);
    };
    client.on('error', retry);
    client.on('end', () => retry(new Error('connection closed')));
    client.on('notification', (m) => {
      if (m.channel === this.channel && m.payload !== undefined) this.on.notified(m.payload);
    });
    try {
      await client.connect();
      await client.query(`LISTEN ${this.channel}`);
    } catch (err) {
      retry(err as Error);
      return;
    }
    if (broken || this.closed) return;
    this.retryMs = RETRY_MIN_MS;
    this.on.connected();
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    const c = this.client;
    this.client = null;
    if (c) {
      c.removeAllListeners();
      c.on('error', () => {});
      await c.end().catch(() => {});
    }
  }
}
