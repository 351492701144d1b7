// Tells systemd-resolved, where it runs, to send queries for the mesh domain to the agent's
// responder: DNS server and domain are set on the mesh interface only (`resolvectl dns/domain
// IFACE`), so the host's other resolvers and search domains stay as they are. Without
// systemd-resolved nothing is touched; /etc/resolv.conf is never written.
import { existsSync } from 'node:fs';
import { run } from '../dataplane/exec.js';

/** Where systemd-resolved keeps its state while it runs. */
const RESOLVED_RUNNING = '/run/systemd/resolve/io.systemd.Resolve';

export function resolvedRunning(): boolean {
  return existsSync(RESOLVED_RUNNING);
}

/** Registers `server` for `domain` on `iface`; the domain is also a search domain, so `ssh fw1` works. */
export async function registerWithResolved(iface: string, server: string, domain: string): Promise<void> {
  await run('resolvectl', ['dns', iface, server]);
  await run('resolvectl', ['domain', iface, domain]);
}
