// The CLI's side of the agent's local API.
import { existsSync } from 'node:fs';
import { request } from 'node:http';
import { userInfo } from 'node:os';
import { operatorSocketPath } from './operator.js';
import type { AgentStatus } from './types.js';

export class LocalApiError extends Error {
  override name = 'LocalApiError';
}

function call<T>(socket: string, method: string, path: string, timeoutMs = 30_000): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: socket, method, path, timeout: timeoutMs }, (res) => {
      let body = '';
      res.on('data', (d) => {
        body += d;
      });
      res.on('end', () => {
        const parsed = body ? JSON.parse(body) : {};
        if ((res.statusCode ?? 500) >= 400)
          reject(new LocalApiError(parsed.error ?? `agent answered ${res.statusCode}`));
        else resolve(parsed as T);
      });
    });
    req.on('timeout', () =>
      req.destroy(new LocalApiError(`the agent did not answer in ${timeoutMs / 1000}s`)),
    );
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (err instanceof LocalApiError) return reject(err);
      if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED')
        reject(
          new LocalApiError(`no agent is running (no socket at ${socket}); start one with "meshgate agent"`),
        );
      else if (err.code === 'EACCES')
        reject(
          Object.assign(
            new LocalApiError(
              method === 'GET'
                ? `permission denied on ${socket}: run as root, or start the agent with --operator ${userName()}`
                : `permission denied on ${socket}: run as root`,
            ),
            { code: 'EACCES' },
          ),
        );
      else reject(new LocalApiError(`cannot talk to the agent at ${socket}: ${err.code ?? err.message}`));
    });
    req.end();
  });
}

function userName(): string {
  try {
    return userInfo().username;
  } catch {
    return 'USER';
  }
}

/** The root socket, else (for root-only sockets) the operator socket next to it. */
export async function agentStatus(socket: string): Promise<AgentStatus> {
  try {
    return await call<AgentStatus>(socket, 'GET', '/status');
  } catch (err) {
    const operator = operatorSocketPath(socket);
    if ((err as { code?: string }).code !== 'EACCES' || !existsSync(operator)) throw err;
    return call<AgentStatus>(operator, 'GET', '/status').catch((e: { code?: string }) => {
      throw e.code === 'EACCES' ? err : e;
    });
  }
}
export const agentDown = (socket: string) => call<{ ok: boolean }>(socket, 'POST', '/down');
export const agentUp = (socket: string) => call<{ ok: boolean }>(socket, 'POST', '/up');
export const agentLogout = (socket: string) => call<{ ok: boolean }>(socket, 'POST', '/logout');
