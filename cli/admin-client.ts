// Connects admin commands to the coordinator: the local admin socket on the
// coordinator's host, or grpcs:// with an API key from elsewhere.
import { existsSync, readFileSync } from 'node:fs';
import { create, type MessageInitShape } from '@bufbuild/protobuf';
import * as grpc from '@grpc/grpc-js';
import type { Command } from 'commander';
import { dial, explainUnavailable } from '../proto/dial.js';
import { AdminService } from '../proto/gen/meshgate/v1/admin_pb.js';
import { CLIENT_RECEIVE_LIMIT, makeClient, type Out, unary } from '../proto/grpc.js';
import { CliError } from './errors.js';
import { FORMATS, type Format, parseFormat } from './output.js';

export const DEFAULT_ADMIN_SOCKET = '/var/lib/meshgate/admin.sock';

export interface AdminFlags {
  coordinator?: string;
  apiKeyFile?: string;
  apiKey?: string;
  fingerprint?: string;
  socket?: string;
  output: string;
}

type Methods = (typeof AdminService)['method'];

export interface AdminClient {
  format: Format;
  display: string;
  call<K extends keyof Methods & string>(
    method: K,
    req: MessageInitShape<Methods[K]['input']>,
  ): Promise<Out<typeof AdminService, K>>;
  close(): void;
}

/** Adds the connection and output flags every admin command takes. */
export function adminCommand(cmd: Command): Command {
  return cmd
    .option('--coordinator <url>', 'coordinator address, grpcs://HOST:PORT (env MESHGATE_COORDINATOR)')
    .option('--api-key-file <file>', 'read the API key from a file (0600)')
    .option(
      '--api-key <key>',
      'API key; prefer MESHGATE_API_KEY or --api-key-file, argv is visible to other users',
    )
    .option('--fingerprint <sha256:hex>', 'pin the coordinator TLS key (env MESHGATE_FINGERPRINT)')
    .option(
      '--socket <path>',
      `coordinator's local admin socket (default ${DEFAULT_ADMIN_SOCKET} when no --coordinator)`,
    )
    .option('-o, --output <format>', `output format: ${FORMATS.join('|')}`, 'table');
}

function readSecretFile(path: string): string {
  const text = readFileSync(path, 'utf8').trim();
  if (!text) throw new CliError(`${path} is empty`);
  return text;
}

export async function connectAdmin(flags: AdminFlags, env = process.env): Promise<AdminClient> {
  const format = parseFormat(flags.output);
  const url = flags.socket
    ? `unix://${flags.socket}`
    : (flags.coordinator ??
      env.MESHGATE_COORDINATOR ??
      (existsSync(DEFAULT_ADMIN_SOCKET) ? `unix://${DEFAULT_ADMIN_SOCKET}` : ''));
  if (!url)
    throw new CliError(
      'no coordinator: pass --coordinator grpcs://HOST:PORT (with --api-key) or --socket PATH on the coordinator host',
    );
  const local = url.startsWith('unix://');
  if (local && !existsSync(url.slice(7)))
    throw new CliError(`no admin socket at ${url.slice(7)}: is the coordinator running with that data dir?`);
  const apiKey = flags.apiKeyFile
    ? readSecretFile(flags.apiKeyFile)
    : (flags.apiKey ?? env.MESHGATE_API_KEY ?? '');
  if (!local && !apiKey)
    throw new CliError(
      'an API key is needed for a remote coordinator: set MESHGATE_API_KEY or pass --api-key-file',
    );
  const fingerprint = flags.fingerprint ?? env.MESHGATE_FINGERPRINT;
  // Several coordinators of one database, comma-separated: a call that finds
  // one unreachable goes to the next (docs/ha.md).
  const urls = local
    ? [url]
    : url
        .split(',')
        .map((u) => u.trim())
        .filter(Boolean);
  const endpoints = await Promise.all(urls.map((u) => dial(u, { fingerprint })));
  const clients = endpoints.map((endpoint) =>
    makeClient(AdminService, endpoint.target, endpoint.credentials, {
      ...CLIENT_RECEIVE_LIMIT,
      ...endpoint.options,
    }),
  );
  let current = 0;
  return {
    format,
    display: endpoints.map((e) => e.display).join(','),
    async call(method, req) {
      const md = new grpc.Metadata();
      if (!local) md.set('authorization', `Bearer ${apiKey}`);
      const m = AdminService.method[method];
      for (let tried = 1; ; tried++) {
        try {
          return await unary(
            clients[current]!,
            AdminService,
            method,
            create(m.input, req as never) as never,
            md,
            {
              deadline: Date.now() + 15_000,
            },
          );
        } catch (err) {
          if ((err as Partial<grpc.ServiceError>)?.code !== grpc.status.UNAVAILABLE) throw err;
          if (tried < clients.length) {
            current = (current + 1) % clients.length;
            continue;
          }
          throw (await explainUnavailable(urls[current]!, { fingerprint })) ?? err;
        }
      }
    },
    close: () => {
      for (const c of clients) c.close();
    },
  };
}
