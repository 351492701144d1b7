// The agent's local API: HTTP with JSON on a unix socket that only root
// (the socket's owner, mode 0600) can open; with an operator, a second socket
// that the operator can open answers status and nothing else.
import { chmodSync, chownSync, existsSync, mkdirSync, unlinkSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { dirname } from 'node:path';
import { type Operator, operatorSocketPath } from './operator.js';
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

type Handler = (req: IncomingMessage, res: ServerResponse) => Promise<void>;

const replyTo = (res: ServerResponse, code: number, body: unknown) => {
  res.writeHead(code, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
};

/** Listens on `socket` with mode 0600 from the first moment; the caller widens it. */
async function listen(socket: string, handler: Handler): Promise<Server> {
  if (existsSync(socket)) unlinkSync(socket);
  const server = createServer(handler);
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
  return server;
}

function close(server: Server, socket: string): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
    if (existsSync(socket)) unlinkSync(socket);
  });
}

export async function startLocalApi(
  socket: string,
  h: LocalHandlers,
  operator?: Operator,
): Promise<LocalApi> {
  mkdirSync(dirname(socket), { recursive: true, mode: 0o755 });
  const server = await listen(socket, async (req, res) => {
    const reply = (code: number, body: unknown) => replyTo(res, code, body);
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
  const opSocket = operatorSocketPath(socket);
  if (!operator) {
    // A socket left from a run with --operator would let its owner believe it still works.
    if (existsSync(opSocket)) unlinkSync(opSocket);
    return { close: () => close(server, socket) };
  }
  const opServer = await listen(opSocket, async (req, res) => {
    try {
      if (req.method === 'GET' && req.url === '/status') return replyTo(res, 200, await h.status());
      replyTo(res, 403, {
        error: `${req.method} ${req.url} needs root: the operator socket only answers status (meshgate status, ping, ssh)`,
      });
    } catch (err) {
      replyTo(res, 500, { error: (err as Error).message });
    }
  });
  if (operator.kind === 'user') chownSync(opSocket, operator.uid, operator.gid);
  else {
    chownSync(opSocket, 0, operator.gid);
    chmodSync(opSocket, 0o660);
  }
  return { close: async () => void (await Promise.all([close(server, socket), close(opServer, opSocket)])) };
}
