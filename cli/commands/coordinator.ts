// `meshgate coordinator`: run the control plane, or print its fingerprint.
import type { Command } from 'commander';
import { loadConfig } from '../../coordinator/config.js';
import { createLogger } from '../../coordinator/log.js';
import { VERSION } from '../../release/version.js';

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
    .option(
      '--releases-dir <dir>',
      'serve release artifacts from DIR under /releases/ on the HTTP port (see meshgate release pack)',
    )
    .option('--plaintext', 'serve without TLS (only behind a TLS-terminating proxy or on a trusted network)')
    .option('--log-level <level>', 'trace, debug, info, warn, error')
    .option('--ephemeral-timeout <duration>', 'remove ephemeral nodes offline this long (default 30m)')
    .addHelpText(
      'after',
      `
Settings come from defaults, then --config, then MESHGATE_* environment
variables (MESHGATE_DATA_DIR, MESHGATE_DATABASE, MESHGATE_GRPC_LISTEN,
MESHGATE_HTTP_LISTEN, MESHGATE_RELEASES_DIR, MESHGATE_LOG_LEVEL, MESHGATE_EPHEMERAL_TIMEOUT), then flags.

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
        releasesDir: o.releasesDir,
        plaintext: o.plaintext,
        logLevel: o.logLevel,
        ephemeralTimeout: o.ephemeralTimeout,
      });
      const log = createLogger(config.logLevel);
      // Loaded here: the release artifact leaves the coordinator (and its SQLite addon) out.
      const { startCoordinator } = await import('../../coordinator/server.js');
      const c = await startCoordinator(config, log);
      process.stdout.write(
        [
          `meshgate coordinator ${VERSION}`,
          `  gRPC          ${config.grpcListen.replace(/:\d+$/, `:${c.grpcPort}`)}${config.plaintext ? ' (plaintext)' : ' (TLS 1.3)'}`,
          // The HTTP listener serves TLS with the same certificate unless --plaintext.
          `  ${config.plaintext ? 'HTTP ' : 'HTTPS'}         ${config.httpListen.replace(/:\d+$/, `:${c.httpPort}`)}`,
          `  admin socket  ${c.adminSocket}`,
          `  database      ${config.database.replace(/\/\/[^@/]*@/, '//***@')}`,
          ...(c.fingerprint ? [`  fingerprint   ${c.fingerprint}`] : []),
          '',
        ].join('\n'),
      );
      await new Promise<void>((resolve) => {
        const stop = (signal: string) => {
          log.info({ signal }, 'shutting down');
          c.close().then(resolve, (err) => {
            log.error({ err }, 'shutdown failed');
            resolve();
          });
        };
        process.once('SIGTERM', () => stop('SIGTERM'));
        process.once('SIGINT', () => stop('SIGINT'));
      });
    });

  cmd
    .command('fingerprint')
    .description("print the SPKI SHA-256 fingerprint of the coordinator's TLS key, for --fingerprint")
    .option('--data-dir <dir>', 'data dir of the coordinator', '/var/lib/meshgate')
    .option('--curl', 'print it as curl --pinnedpubkey wants it: sha256//BASE64')
    .action(async (o: { dataDir: string; curl?: boolean }) => {
      const { loadTlsIdentity } = await import('../../coordinator/tls.js');
      const fp = loadTlsIdentity(o.dataDir).fingerprint;
      const pin = `sha256//${Buffer.from(fp.slice('sha256:'.length), 'hex').toString('base64')}`;
      process.stdout.write(`${o.curl ? pin : fp}\n`);
    });
}
