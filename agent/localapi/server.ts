// The agent's local API: HTTP with JSON on a unix socket that only root
// (the socket's owner, mode 0600) can open.
import { chmodSync, existsSync, mkdirSync, unlinkSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname } from 'node:path';
import type { AgentStatus } from './types.js';

export interface LocalHandlers {
  status(): Promise<AgentStatus>;
  down(): Promise<void>;
  up(): Promise<void>;
  logout(): Promise<void>;
  /** Prometheus text format. */
  metrics(): string;
}

export interface LocalApi {
  close(): Promise<void>;
}

export async function startLocalApi(socket: string, h: LocalHandlers): Promise<LocalApi> {
  mkdirSync(dirname(socket), { recursive: true, mode: 0o755 });
  if (existsSync(socket)) unlinkSync(socket);
  const server = createServer(async (req, res) => {
    const reply = (code: number, body: unknown) => {
      res.writeHead(code, { 'content-type': 'application/json' });
      res.end(JSON.stringify(body));
    };
    try {
      if (req.method === 'GET' && req.url === '/status') return reply(200, await h.status());
      if (req.method === 'GET' && req.url === '/metrics') {
        res.writeHead(200, { 'content-type': 'text/plain; version=0.0.4' });
        res.end(h.metrics());
        return;
      }
      if (req.method === 'POST' && req.url === '/down') {
        await h.down();
        return reply(200, { ok: true });
      }
      if (req.method === 'POST' && req.url === '/up') {
        await h.up();
        return reply(200, { ok: true });
      }
      if (req.method === 'POST' && req.url === '/logout') {
        await h.logout();
        return reply(200, { ok: true });
      }
      reply(404, { error: `no ${req.method} ${req.url}` });
    } catch (err) {
      reply(500, { error: (err as Error).message });
    }
  });
  const old = process.umask(0o177);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socket, resolve);
    });
  } finally {
    process.umask(old);
  }
  chmodSync(socket, 0o600);
  return {
    close: () =>
      new Promise((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
        if (existsSync(socket)) unlinkSync(socket);
      }),
  };
}
