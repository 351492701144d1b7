// The CLI's side of the agent's local API.
import { request } from 'node:http';
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
        reject(new LocalApiError(`permission denied on ${socket}: run as root`));
      else reject(new LocalApiError(`cannot talk to the agent at ${socket}: ${err.code ?? err.message}`));
    });
    req.end();
  });
}

export const agentStatus = (socket: string) => call<AgentStatus>(socket, 'GET', '/status');
export const agentDown = (socket: string) => call<{ ok: boolean }>(socket, 'POST', '/down');
export const agentUp = (socket: string) => call<{ ok: boolean }>(socket, 'POST', '/up');
export const agentLogout = (socket: string) => call<{ ok: boolean }>(socket, 'POST', '/logout');
