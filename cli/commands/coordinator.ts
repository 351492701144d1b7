// `meshgate coordinator`: run the control plane, or print its fingerprint.
import type { Command } from 'commander';
import { loadConfig } from '../../coordinator/config.js';
import { createLogger } from '../../coordinator/log.js';
import { startCoordinator, VERSION } from '../../coordinator/server.js';
import { loadTlsIdentity } from '../../coordinator/tls.js';

/** Streams get 3 s of grace inside close(); this bounds the whole shutdown, database included. */
const SHUTDOWN_LIMIT_MS = 10_000;

export function registerCoordinatorCommands(program: Command): void {
  const cmd = program
    .command('coordinator')
    .description('run the coordination server (gRPC admin + control API, HTTP health/metrics/REST)')
    .option('--config <file>', 'YAML configuration file')
    .option(
      '--data-dir <dir>',
      'state: database, TLS key and certificate, admin socket (default /var/lib/meshgate)',
    )
    .option('--database <url>', 'sqlite:///path/file.db (default in the data dir) or postgres://…')
    .option('--grpc-listen <host:port>', 'gRPC listener (default 0.0.0.0:7443)')
    .option(
      '--http-listen <host:port>',
      'HTTP listener for /healthz, /readyz, /metrics and /api/v1 (default 0.0.0.0:7480)',
    )
    .option('--plaintext', 'serve without TLS (only behind a TLS-terminating proxy or on a trusted network)')
    .option('--log-level <level>', 'trace, debug, info, warn, error')
    .option('--ephemeral-timeout <duration>', 'remove ephemeral nodes offline this long (default 30m)')
    .addHelpText(
      'after',
      `
Settings come from defaults, then --config, then MESHGATE_* environment
variables (MESHGATE_DATA_DIR, MESHGATE_DATABASE, MESHGATE_GRPC_LISTEN,
MESHGATE_HTTP_LISTEN, MESHGATE_LOG_LEVEL, MESHGATE_EPHEMERAL_TIMEOUT), then flags.

On first start a TLS key and a self-signed certificate are made in the data
dir; clients pin the printed fingerprint with --fingerprint. The local admin
socket (0600) in the data dir needs no API key: use it to create the first one:
  meshgate apikeys create --socket DATA_DIR/admin.sock`,
    )
    .action(async (o: Record<string, string | boolean | undefined>) => {
      const config = loadConfig(o.config as string | undefined, process.env, {
        dataDir: o.dataDir,
        database: o.database,
        grpcListen: o.grpcListen,
        httpListen: o.httpListen,
        plaintext: o.plaintext,
        logLevel: o.logLevel,
        ephemeralTimeout: o.ephemeralTimeout,
      });
      const log = createLogger(config.logLevel);
      const c = await startCoordinator(config, log);
      process.stdout.write(
        [
          `meshgate coordinator ${VERSION}`,
          `  gRPC          ${config.grpcListen.replace(/:\d+$/, `:${c.grpcPort}`)}${config.plaintext ? ' (plaintext)' : ' (TLS 1.3)'}`,
          `  HTTP          ${config.httpListen.replace(/:\d+$/, `:${c.httpPort}`)}`,
          `  admin socket  ${c.adminSocket}`,
          `  database      ${config.database.replace(/\/\/[^@/]*@/, '//***@')}`,
          ...(c.fingerprint ? [`  fingerprint   ${c.fingerprint}`] : []),
          '',
        ].join('\n'),
      );
      // close() gives streams a grace period, then cancels them and writes the last_seen batch. A
      // connection whose peer stopped reading (a frozen host) still holds its socket open after
      // that, with writes queued that will never drain: the process ends itself instead of waiting
      // for the event loop to empty. A close() that hangs (an unreachable database) is cut off.
      let stopping = false;
      const stop = (signal: string) => {
        if (stopping) {
          log.warn({ signal }, 'second signal: exiting without finishing the shutdown');
          process.exit(1);
        }
        stopping = true;
        const started = Date.now();
        log.info({ signal }, 'shutting down');
        setTimeout(() => {
          log.error(
            { limitMs: SHUTDOWN_LIMIT_MS },
            'shutdown did not finish in time; exiting without it (last_seen may be up to 5 s old)',
          );
          process.exit(1);
        }, SHUTDOWN_LIMIT_MS).unref();
        c.close().then(
          () => {
            log.info({ ms: Date.now() - started }, 'stopped');
            process.exit(0);
          },
          (err) => {
            log.error({ err }, 'shutdown failed');
            process.exit(1);
          },
        );
      };
      process.on('SIGTERM', () => stop('SIGTERM'));
      process.on('SIGINT', () => stop('SIGINT'));
    });

  cmd
    .command('fingerprint')
    .description("print the SPKI SHA-256 fingerprint of the coordinator's TLS key, for --fingerprint")
    .option('--data-dir <dir>', 'data dir of the coordinator', '/var/lib/meshgate')
    .action((o: { dataDir: string }) => {
      process.stdout.write(`${loadTlsIdentity(o.dataDir).fingerprint}\n`);
    });
}
